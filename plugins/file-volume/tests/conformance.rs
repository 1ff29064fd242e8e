//! file-volume meets the volume contract (plughost-api's conformance suite, through the stable-ABI glue).
use plughost_api::{Options, VolumeClient};

#[test]
fn file_volume_meets_the_volume_contract() {
    let root = std::env::temp_dir().join(format!("file-volume-conformance-{}", std::process::id()));
    let report = plughost_api::testing::check_volume(&|| {
        let options =
            Options::for_schema(file_volume::OPTIONS, [("root", root.to_str().unwrap_or("")), ("sync", "false")]);
        Ok(Box::new(VolumeClient::in_process(file_volume::FileVolume::new(&options)?)))
    });
    let _ = std::fs::remove_dir_all(&root);
    report.assert_passed();
}
