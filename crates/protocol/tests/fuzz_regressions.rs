//! Every input saved under `fuzz/regressions/<target>/` (a crash the fuzzers found, or a
//! hand-written hard case) and the seed corpus are replayed through the fuzz targets'
//! checks: a crash found once stays fixed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["regressions", "corpus"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails", path.display());
            n += 1;
        }
    }
    n
}

#[test]
fn v1_decode_regressions() {
    assert!(replay("v1_decode", wschat_protocol::fuzzing::v1_decode) > 0);
}

#[test]
fn legacy_decode_regressions() {
    assert!(replay("legacy_decode", wschat_protocol::fuzzing::legacy_decode) > 0);
}
