//! Fuzzes the NBD request and option parsers: any bytes, never a panic; a request that
//! parses encodes back to the same bytes; option payloads never read past their end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::proto::{InfoRequest, MetaRequest, OptionHeader, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = <&[u8; Request::LEN]>::try_from(data.get(..Request::LEN).unwrap_or(&[])) {
        if let Ok(r) = Request::parse(h) {
            assert_eq!(&r.encode(), h);
            let _ = r.in_range(u64::MAX);
        }
    }
    if let Ok(h) = <&[u8; OptionHeader::LEN]>::try_from(data.get(..OptionHeader::LEN).unwrap_or(&[])) {
        let _ = OptionHeader::parse(h);
    }
    if let Some(r) = InfoRequest::parse(data) {
        assert!(r.name.len() <= 4096);
    }
    if let Some(m) = MetaRequest::parse(data) {
        assert!(m.queries.iter().all(|q| q.len() <= 4096));
    }
});
