//! file-volume meets the volume contract (plughost-api's conformance suite, through the stable-ABI glue),
//! with its options as a host gives them (`root` defaults to `${state_dir}/volumes/${backend}`).
use plughost_api::testing::{check_volume, TestHost};
use plughost_api::VolumeClient;

#[test]
fn file_volume_meets_the_volume_contract() {
    let host = TestHost::new();
    check_volume(&|| {
        let options = host.options(file_volume::OPTIONS, &[("sync", "false")])?;
        Ok(Box::new(VolumeClient::in_process(file_volume::FileVolume::new(&options)?)))
    })
    .assert_passed();
}
