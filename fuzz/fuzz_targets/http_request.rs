//! The control API's HTTP request parser (`agent::http::read_request`) on arbitrary
//! bytes, as any client of the TCP management address can send before it is
//! authenticated: it must answer with a request or an error, never panic or grow
//! without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    if let Ok(req) = rt.block_on(agent::http::read_request(data)) {
        assert!(req.body.len() <= 1 << 20);
        let _ = req.header("authorization");
        let _ = req.param("path");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(d) = agent::http::percent_decode(s, true) {
            assert!(d.len() <= s.len());
        }
        let e = agent::http::percent_encode(s);
        assert_eq!(agent::http::percent_decode(&e, false).unwrap(), s);
    }
});
