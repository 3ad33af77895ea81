//! The test guest's judge: the record every workload sector holds, the log line for every
//! acknowledged write, and the host-side check that every acknowledged write is on a
//! disk image.
//!
//! The workload (`src/bin/workload.rs`, run inside the guest) writes whole 512-byte
//! sectors, each a [`Record`] naming its own address and the write's sequence number,
//! flushes, and only then logs the write (`FW …`) on the serial console: a logged write
//! is an acknowledged, durable one. [`check`] reads the console log(s) and an image and
//! demands that each sector holds its last logged write or a later one (the one write in
//! flight when the log ends may or may not have landed), reports the longest gap between
//! acknowledged writes — the guest-visible I/O pause — and fails when a phase the caller
//! names saw too few writes or overwrites, so a stalled workload can never pass.

use std::collections::HashMap;

/// Bytes per record: one sector.
pub const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"FRYWKLD1";

/// One sector as the workload writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The sector's own index on the disk.
    pub sector: u64,
    /// The write's sequence number (1, 2, …; one per write, in order).
    pub seq: u64,
    /// The workload run (random per boot).
    pub run: u64,
}

impl Record {
    /// Encodes into a sector: header, filler derived from the header, crc32c.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), SECTOR);
        out[0..8].copy_from_slice(MAGIC);
        out[8..16].copy_from_slice(&self.sector.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.run.to_le_bytes());
        let mut x = self.seq ^ self.sector.rotate_left(32) ^ self.run ^ 0x9e37_79b9_7f4a_7c15;
        for chunk in out[32..SECTOR - 4].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let crc = crc32c::crc32c(&out[..SECTOR - 4]);
        out[SECTOR - 4..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a sector: None if it is not an intact record.
    pub fn decode(b: &[u8]) -> Option<Record> {
        if b.len() != SECTOR || &b[0..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[SECTOR - 4..].try_into().ok()?);
        if crc32c::crc32c(&b[..SECTOR - 4]) != crc {
            return None;
        }
        let u = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let r = Record {
            sector: u(8),
            seq: u(16),
            run: u(24),
        };
        let mut again = [0u8; SECTOR];
        r.encode(&mut again);
        (again[..] == b[..]).then_some(r)
    }
}

/// One acknowledged write as logged: `FW seq first_sector sectors uptime_ms wall_ms
/// overwrite run crc`, where `crc` is the crc32c of the line before it, so a line cut
/// short (or two pieces glued wrongly) never reads as a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub seq: u64,
    pub sector: u64,
    pub sectors: u64,
    /// Guest uptime when the flush returned.
    pub uptime_ms: u64,
    /// Guest wall clock then (ms since the epoch).
    pub wall_ms: u64,
    /// Whether it rewrote sectors written before.
    pub overwrite: bool,
    pub run: u64,
}

impl Acked {
    pub fn line(&self) -> String {
        let body = format!(
            "FW {} {} {} {} {} {} {:x}",
            self.seq,
            self.sector,
            self.sectors,
            self.uptime_ms,
            self.wall_ms,
            self.overwrite as u8,
            self.run
        );
        let crc = crc32c::crc32c(body.as_bytes());
        format!("{body} {crc:08x}")
    }

    /// Parses a log line (anything before the last `FW ` is ignored: console noise).
    pub fn parse(line: &str) -> Option<Acked> {
        let at = line.rfind("FW ")?;
        let text = line[at..].trim_end_matches('\r');
        let (body, crc) = text.rsplit_once(' ')?;
        if crc.len() != 8 || u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(body.as_bytes()) {
            return None;
        }
        let f: Vec<&str> = body[3..].split(' ').collect();
        if f.len() != 7 {
            return None;
        }
        Some(Acked {
            seq: f[0].parse().ok()?,
            sector: f[1].parse().ok()?,
            sectors: f[2].parse().ok()?,
            uptime_ms: f[3].parse().ok()?,
            wall_ms: f[4].parse().ok()?,
            overwrite: f[5] == "1",
            run: u64::from_str_radix(f[6], 16).ok()?,
        })
    }
}

/// Every acknowledged write in console logs (several boots' logs may be given; only
/// runs are told apart, order within a run is by sequence number).
///
/// A guest that moves between hosts while it prints a line leaves the line's head at the
/// end of one log (or of one stretch of a log: the agent starts every QEMU run on a new
/// line) and its tail at the start of the next; such pieces are joined again, and the
/// checksum accepts only the true pair. A last line without its newline (a log read
/// while the guest writes it) counts only when it is whole.
pub fn parse_logs(logs: &[&str]) -> Vec<Acked> {
    let mut out = Vec::new();
    let mut heads = Vec::new();
    let mut pieces = Vec::new();
    for l in logs {
        for seg in l.split('\n') {
            match Acked::parse(seg) {
                Some(a) => out.push(a),
                None if seg.is_empty() => {}
                None => {
                    if seg.contains("FW") || seg.ends_with('F') {
                        heads.push(seg);
                    }
                    pieces.push(seg);
                }
            }
        }
    }
    for h in &heads {
        let joined = pieces
            .iter()
            .filter(|t| !std::ptr::eq(**t, *h))
            .find_map(|t| Acked::parse(&format!("{h}{t}")));
        out.extend(joined);
    }
    out.sort_by_key(|a| (a.run, a.seq));
    out.dedup();
    out
}

/// A phase the caller wants writes in: wall-clock range and minimums.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub from_wall_ms: u64,
    pub to_wall_ms: u64,
    pub min_writes: usize,
    pub min_overwrites: usize,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub acked: usize,
    pub overwrites: usize,
    pub sectors: usize,
    /// Longest gap between consecutive acknowledged writes, by guest uptime, and when
    /// it ended (guest wall clock).
    pub longest_gap_ms: u64,
    pub longest_gap_end_wall_ms: u64,
    /// Per phase: (name, writes, overwrites).
    pub phases: Vec<(String, usize, usize)>,
    /// Everything wrong, one line each.
    pub errors: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks `acked` (one run) against an image read through `read_sectors(first, n)`.
pub fn check(
    acked: &[Acked],
    phases: &[Phase],
    read_sectors: impl FnMut(u64, u64) -> std::io::Result<Vec<u8>>,
) -> Report {
    check_inner(acked, phases, 1, read_sectors)
}

/// [`check`] against a disk the guest still writes to: a sector may also hold any later
/// write of the same run (acknowledged after the log was read).
pub fn check_live(
    acked: &[Acked],
    read_sectors: impl FnMut(u64, u64) -> std::io::Result<Vec<u8>>,
) -> Report {
    check_inner(acked, &[], u64::MAX, read_sectors)
}

fn check_inner(
    acked: &[Acked],
    phases: &[Phase],
    later: u64,
    mut read_sectors: impl FnMut(u64, u64) -> std::io::Result<Vec<u8>>,
) -> Report {
    let mut r = Report {
        acked: acked.len(),
        ..Report::default()
    };
    if acked.is_empty() {
        r.errors.push("no acknowledged write in the log".into());
        return r;
    }
    let runs: std::collections::BTreeSet<u64> = acked.iter().map(|a| a.run).collect();
    if runs.len() != 1 {
        r.errors.push(format!(
            "the log holds {} workload runs; check one at a time",
            runs.len()
        ));
        return r;
    }
    let run = acked[0].run;
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut prev: Option<&Acked> = None;
    for a in acked {
        if let Some(p) = prev {
            if a.seq != p.seq + 1 {
                r.errors.push(format!(
                    "write {} follows write {} in the log: acknowledged writes are missing from it",
                    a.seq, p.seq
                ));
            }
            let gap = a.uptime_ms.saturating_sub(p.uptime_ms);
            if gap > r.longest_gap_ms {
                r.longest_gap_ms = gap;
                r.longest_gap_end_wall_ms = a.wall_ms;
            }
        }
        prev = Some(a);
        r.overwrites += a.overwrite as usize;
        for s in a.sector..a.sector + a.sectors {
            last.insert(s, a.seq);
        }
    }
    let max_seq = acked.last().expect("not empty").seq;
    r.sectors = last.len();
    // Read in runs of consecutive sectors.
    let mut sectors: Vec<u64> = last.keys().copied().collect();
    sectors.sort_unstable();
    let mut i = 0;
    while i < sectors.len() {
        let start = sectors[i];
        let mut n = 1;
        while i + (n as usize) < sectors.len() && sectors[i + n as usize] == start + n && n < 2048 {
            n += 1;
        }
        match read_sectors(start, n) {
            Ok(data) => {
                for k in 0..n {
                    let s = start + k;
                    let want = last[&s];
                    let b = &data[k as usize * SECTOR..(k as usize + 1) * SECTOR];
                    match Record::decode(b) {
                        Some(rec) if rec.sector == s && rec.run == run && rec.seq >= want && rec.seq <= max_seq.saturating_add(later) => {}
                        Some(rec) => r.errors.push(format!(
                            "sector {s}: holds write {} of run {:x} for sector {}; acknowledged: write {want}",
                            rec.seq, rec.run, rec.sector
                        )),
                        None => r.errors.push(format!(
                            "sector {s}: no intact record; acknowledged: write {want}"
                        )),
                    }
                    if r.errors.len() > 20 {
                        r.errors.push("… (stopping after 20 errors)".into());
                        return r;
                    }
                }
            }
            Err(e) => {
                r.errors
                    .push(format!("reading sectors {start}..{}: {e}", start + n));
                return r;
            }
        }
        i += n as usize;
    }
    for p in phases {
        let inp: Vec<&Acked> = acked
            .iter()
            .filter(|a| a.wall_ms >= p.from_wall_ms && a.wall_ms < p.to_wall_ms)
            .collect();
        let w = inp.len();
        let o = inp.iter().filter(|a| a.overwrite).count();
        if w < p.min_writes || o < p.min_overwrites {
            r.errors.push(format!(
                "phase {}: {w} acknowledged writes ({o} overwrites); at least {} ({}) were required — \
                 did the workload stall?",
                p.name, p.min_writes, p.min_overwrites
            ));
        }
        r.phases.push((p.name.clone(), w, o));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_seen() {
        let r = Record {
            sector: 77,
            seq: 5,
            run: 0xabc,
        };
        let mut b = [0u8; SECTOR];
        r.encode(&mut b);
        assert_eq!(Record::decode(&b), Some(r));
        b[100] ^= 1;
        assert_eq!(Record::decode(&b), None);
        assert_eq!(Record::decode(&[0u8; SECTOR]), None);
    }

    #[test]
    fn log_lines_round_trip_through_console_noise() {
        let a = Acked {
            seq: 9,
            sector: 1000,
            sectors: 8,
            uptime_ms: 1234,
            wall_ms: 1_700_000_000_000,
            overwrite: true,
            run: 0xdead,
        };
        assert_eq!(Acked::parse(&format!("\r[  1.2] {}", a.line())), Some(a));
        assert_eq!(Acked::parse("FW 1 2"), None);
        // A log read while the guest writes it: the cut last line is not a write (of
        // some other run) yet, wherever it is cut.
        let full = format!("{}\n", a.line());
        for cut in 1..full.len() - 1 {
            assert_eq!(
                parse_logs(&[&format!("{full}{}", &full[..cut])]),
                vec![a],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_line_cut_by_a_move_between_hosts_is_joined_again_and_only_with_its_own_tail() {
        let w: Vec<Acked> = acked(&[(1, 0, 8), (2, 8, 8), (3, 16, 8), (4, 24, 8)], 0xabc);
        let l: Vec<String> = w.iter().map(|a| a.line()).collect();
        for cut in 1..l[1].len() {
            // Host A ran the guest until it moved mid-line 2; host B printed the rest.
            let a = format!("boot noise\n{}\n{}", l[0], &l[1][..cut]);
            let b = format!("{}\n{}\n{}\n", &l[1][cut..], l[2], l[3]);
            assert_eq!(parse_logs(&[&a, &b]), w, "cut at {cut}");
            // And back to A, which starts the new run of QEMU on a new line: the
            // second move cut line 4.
            let a2 = format!("{a}\n{}\n", &l[3][5..]);
            let b2 = format!("{}\n{}\n{}", &l[1][cut..], l[2], &l[3][..5]);
            assert_eq!(parse_logs(&[&a2, &b2]), w, "cut at {cut}");
        }
        // Two cut lines whose pieces are swapped never read as writes.
        let (h1, t1) = l[1].split_at(12);
        let (h3, t3) = l[3].split_at(12);
        let got = parse_logs(&[&format!("{h1}\n{t3}\n{h3}\n{t1}\n")]);
        assert_eq!(got, vec![w[1], w[3]]);
        let bad = format!("{h1}{t3}");
        assert_eq!(Acked::parse(&bad), None);
    }

    /// A disk as a map, for the checker.
    fn disk_with(writes: &[(u64, u64, u64)], run: u64) -> HashMap<u64, [u8; SECTOR]> {
        let mut d = HashMap::new();
        for &(seq, sector, n) in writes {
            for s in sector..sector + n {
                let mut b = [0u8; SECTOR];
                Record {
                    sector: s,
                    seq,
                    run,
                }
                .encode(&mut b);
                d.insert(s, b);
            }
        }
        d
    }

    fn acked(writes: &[(u64, u64, u64)], run: u64) -> Vec<Acked> {
        writes
            .iter()
            .map(|&(seq, sector, sectors)| Acked {
                seq,
                sector,
                sectors,
                uptime_ms: seq * 10,
                wall_ms: 1000 + seq * 10,
                overwrite: seq % 2 == 0,
                run,
            })
            .collect()
    }

    fn read(
        d: &HashMap<u64, [u8; SECTOR]>,
    ) -> impl FnMut(u64, u64) -> std::io::Result<Vec<u8>> + '_ {
        move |s, n| {
            let mut v = Vec::new();
            for k in s..s + n {
                v.extend_from_slice(&d.get(&k).copied().unwrap_or([0u8; SECTOR]));
            }
            Ok(v)
        }
    }

    #[test]
    fn the_checker_passes_a_faithful_disk_and_fails_lost_or_stale_writes() {
        let w = [(1, 0, 8), (2, 4, 8), (3, 100, 1), (4, 0, 2)];
        let d = disk_with(&w, 7);
        let r = check(&acked(&w, 7), &[], read(&d));
        assert!(r.ok(), "{:?}", r.errors);
        assert_eq!(r.sectors, 8 + 4 + 1);
        // The last write lost: sectors 0..2 hold write 1.
        let d2 = disk_with(&w[..3], 7);
        let r = check(&acked(&w, 7), &[], read(&d2));
        assert!(!r.ok());
        assert!(r.errors[0].contains("sector 0"), "{:?}", r.errors);
        // A write in flight at the end (not logged) may have landed.
        let w5 = [(1, 0, 8), (2, 4, 8), (3, 100, 1), (4, 0, 2), (5, 100, 1)];
        let r = check(&acked(&w, 7), &[], read(&disk_with(&w5, 7)));
        assert!(r.ok(), "{:?}", r.errors);
        // Another run's data is not ours.
        let r = check(&acked(&w, 7), &[], read(&disk_with(&w, 8)));
        assert!(!r.ok());
        // A gap in the log is an error.
        let r = check(
            &acked(&[(1, 0, 1), (3, 1, 1)], 7),
            &[],
            read(&disk_with(&[(1, 0, 1), (3, 1, 1)], 7)),
        );
        assert!(!r.ok());
    }

    #[test]
    fn phases_demand_writes_and_the_longest_gap_is_reported() {
        let w: Vec<(u64, u64, u64)> = (1..=20).map(|s| (s, s * 10, 1)).collect();
        let mut a = acked(&w, 1);
        // A 500 ms pause before write 16.
        for x in a.iter_mut().skip(15) {
            x.uptime_ms += 500;
        }
        let d = disk_with(&w, 1);
        let phases = [
            Phase {
                name: "before".into(),
                from_wall_ms: 0,
                to_wall_ms: 1100,
                min_writes: 5,
                min_overwrites: 2,
            },
            Phase {
                name: "after".into(),
                from_wall_ms: 5000,
                to_wall_ms: 9000,
                min_writes: 1,
                min_overwrites: 0,
            },
        ];
        let r = check(&a, &phases, read(&d));
        assert_eq!(r.longest_gap_ms, 510);
        assert_eq!(r.phases[0].1, 9);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].contains("phase after"), "{:?}", r.errors);
    }
}
