//! What a driver author gets: the conformance suite through `plughost check`, and `plughost new`.
#![allow(clippy::unwrap_used)]

use plughost_tests::process::run;
use plughost_tests::{driver, fixtures};
use serde_json::Value;

fn check_json(path: &std::path::Path, opts: &[&str]) -> (i32, Value) {
    let mut args = vec!["check", "--json"];
    for o in opts {
        args.extend(["--opt", o]);
    }
    args.push(path.to_str().unwrap());
    let r = run(&args);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r.code, v)
}

fn failed(v: &Value) -> Vec<String> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_reference_driver_passes_the_conformance_suite_through_the_loader() {
    for (name, opts) in [
        ("fake-volume", vec![]),
        ("file-volume", vec!["sync=false"]),
        ("faulty", vec![]),
        ("fake-compute", vec![]),
        ("process-compute", vec![]),
    ] {
        let (code, v) = check_json(&driver(name), &opts);
        assert_eq!((code, failed(&v)), (0, Vec::<String>::new()), "{name}: {v}");
        let expected = if name.ends_with("compute") { 10 } else { 14 };
        assert_eq!(v["checks"].as_array().unwrap().len(), expected, "{name}: {v}");
    }
}

#[test]
fn a_sloppy_driver_fails_exactly_the_checks_it_should() {
    let (code, v) = check_json(&fixtures::built().sloppy_volume, &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(failed(&v), ["shrink_is_invalid_argument", "stats_match_list"], "{v}");
    let r = run(&["check", fixtures::built().sloppy_volume.to_str().unwrap()]);
    assert!(
        r.stdout.contains("FAIL  shrink_is_invalid_argument") && r.stdout.contains("14 checks, 12 passed, 2 failed"),
        "{}",
        r.stdout
    );
}

#[test]
fn what_cannot_be_checked_says_why() {
    let (code, v) = check_json(&fixtures::system_library(), &[]);
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap().contains("not a plughost driver"), "{v}");
    let (code, v) = check_json(&fixtures::crash_on_load(), &[]);
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap().contains("killed the check process (signal 6, SIGABRT)"), "{v}");
    let (code, v) = check_json(&driver("fake-volume"), &["bogus=1"]);
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap().contains("unknown option"), "{v}");
}
