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

#[test]
fn a_new_driver_crate_passes_cargo_test_and_plughost_check_as_generated() {
    use plughost_tests::{cargo, target_dir, workspace_root, TempDir};
    let t = TempDir::new("new-driver");
    // One target dir for the generated crates across runs, so that their dependencies build once.
    let target = target_dir().join("scaffold");
    for (name, kind, checks) in [("my-volume", "volume", 14), ("my-compute", "compute", 10)] {
        let r = run(&["new", name, "--kind", kind, "--path", t.path().to_str().unwrap()]);
        assert_eq!(r.code, 0, "{r:?}");
        let dir = t.join(name);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let api = workspace_root().join("plugin-api").canonicalize().unwrap();
        assert!(
            manifest.contains(&format!("plughost-api = {{ path = {:?} }}", api.display().to_string())),
            "{manifest}"
        );
        // The workspace's lock file, so that the build needs nothing new from the network.
        std::fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        for step in [["test", "--offline"], ["build", "--offline"]] {
            let status = cargo()
                .current_dir(&dir)
                .env("CARGO_TARGET_DIR", &target)
                .args(step)
                .arg("--quiet")
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "cargo {step:?} of the generated {kind} driver failed");
        }
        let lib = target.join("debug").join(format!("lib{}.so", name.replace('-', "_")));
        let (code, v) = check_json(&lib, &[]);
        assert_eq!((code, failed(&v)), (0, Vec::<String>::new()), "{v}");
        assert_eq!(v["checks"].as_array().unwrap().len(), checks);
    }
    let again = run(&["new", "my-volume", "--kind", "volume", "--path", t.path().to_str().unwrap()]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("exists and is not empty"), "{}", again.stderr);
    let bad = run(&["new", "My Driver", "--kind", "volume", "--path", t.path().to_str().unwrap()]);
    assert!(bad.code == 1 && bad.stderr.contains("use 1-64 of a-z 0-9 - _"), "{bad:?}");
    assert_eq!(run(&["new", "x", "--kind", "network"]).code, 2);
}

#[test]
fn plughost_api_packages_for_crates_io() {
    use plughost_tests::{cargo, workspace_root};
    let out = cargo()
        .current_dir(workspace_root())
        .args(["package", "-p", "plughost-api", "--offline", "--allow-dirty", "--list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files = String::from_utf8(out.stdout).unwrap();
    for f in ["Cargo.toml", "README.md", "CHANGELOG.md", "RELEASES", "src/lib.rs", "src/testing.rs"] {
        assert!(files.lines().any(|l| l == f), "{f} is not in the package:\n{files}");
    }
    let status = cargo()
        .current_dir(workspace_root())
        .args(["package", "-p", "plughost-api", "--offline", "--allow-dirty", "--quiet"])
        .status()
        .unwrap();
    assert!(status.success(), "cargo package (with its verification build) failed");
}
