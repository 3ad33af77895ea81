//! Fuzzes the qcow2 header parser: any bytes, any claimed file length, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = diskfmt::qcow2::header::parse(data, data.len() as u64);
    // The same bytes claimed to start a much larger file (tables then fit).
    let _ = diskfmt::qcow2::header::parse(data, 1 << 40);
});
