//! The test side of [`datastore::failpoint`]: hooks read from `FERRY_FAILPOINTS`, a comma
//! list of `point` (fires at every hit), `point@N` (fires from its N-th hit on) and
//! `setting=NUMBER`. Installed by `ferry-hooked` (the test build of the command) and by
//! the test tools that run datastore code.

use std::collections::HashMap;
use std::sync::Mutex;

use datastore::failpoint::Hooks;

/// Hooks parsed from one `FERRY_FAILPOINTS` value.
#[derive(Debug, Default)]
pub struct EnvHooks {
    /// Point → the hit it fires from (1 = the first).
    points: HashMap<String, u64>,
    settings: HashMap<String, u64>,
    hits: Mutex<HashMap<String, u64>>,
}

impl EnvHooks {
    /// Parses a `FERRY_FAILPOINTS` value; panics on a malformed entry (a test bug).
    pub fn parse(spec: &str) -> EnvHooks {
        let mut h = EnvHooks::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Some((k, v)) = item.split_once('=') {
                let v = v
                    .parse()
                    .unwrap_or_else(|_| panic!("FERRY_FAILPOINTS: {item}"));
                h.settings.insert(k.to_string(), v);
            } else if let Some((k, n)) = item.split_once('@') {
                let n = n
                    .parse()
                    .unwrap_or_else(|_| panic!("FERRY_FAILPOINTS: {item}"));
                h.points.insert(k.to_string(), n);
            } else {
                h.points.insert(item.to_string(), 1);
            }
        }
        h
    }
}

impl Hooks for EnvHooks {
    fn fires(&self, point: &str) -> bool {
        let Some(from) = self.points.get(point) else {
            return false;
        };
        let mut hits = self.hits.lock().expect("hits");
        let n = hits.entry(point.to_string()).or_default();
        *n += 1;
        *n >= *from
    }

    fn setting(&self, setting: &str) -> Option<u64> {
        self.settings.get(setting).copied()
    }
}

/// Installs hooks from `FERRY_FAILPOINTS`, if set.
pub fn install_from_env() {
    if let Ok(spec) = std::env::var("FERRY_FAILPOINTS") {
        datastore::failpoint::install(Box::new(EnvHooks::parse(&spec)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_fire_from_their_nth_hit_and_settings_are_numbers() {
        let h = EnvHooks::parse("a, b@3, renew-delay-ms=700");
        assert!(h.fires("a") && h.fires("a"));
        assert!(!h.fires("b") && !h.fires("b") && h.fires("b") && h.fires("b"));
        assert!(!h.fires("c"));
        assert_eq!(h.setting("renew-delay-ms"), Some(700));
        assert_eq!(h.setting("x"), None);
    }
}
