#[test]
fn a_console_log_past_its_limit_is_rotated_and_appends_go_on() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("console.log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .unwrap();
    f.write_all(&[b'a'; 1000]).unwrap();
    super::rotate_console(&p, 2000);
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        1000,
        "rotated too early"
    );
    f.write_all(&[b'b'; 1500]).unwrap();
    super::rotate_console(&p, 2000);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    assert_eq!(
        std::fs::metadata(p.with_extension("log.1")).unwrap().len(),
        2500
    );
    f.write_all(b"next").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"next");
}

#[test]
fn each_run_of_qemu_starts_its_console_on_a_new_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("console.log");
    super::end_console_line(&p).unwrap();
    assert!(!p.exists());
    std::fs::write(&p, b"").unwrap();
    super::end_console_line(&p).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"");
    std::fs::write(&p, b"whole\nFW 12 3").unwrap();
    super::end_console_line(&p).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"whole\nFW 12 3\n");
    super::end_console_line(&p).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"whole\nFW 12 3\n");
}
