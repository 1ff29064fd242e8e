//! fake-volume meets the volume contract (plughost-api's conformance suite, through the stable-ABI glue).
use plughost_api::{Options, VolumeClient};

#[test]
fn fake_volume_meets_the_volume_contract() {
    plughost_api::testing::check_volume(&|| {
        let driver = fake_volume::FakeVolume::new(&Options::defaults(fake_volume::OPTIONS))?;
        Ok(Box::new(VolumeClient::in_process(driver)))
    })
    .assert_passed();
}
