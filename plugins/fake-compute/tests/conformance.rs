//! fake-compute meets the compute contract (plughost-api's conformance suite, through the stable-ABI glue).
use plughost_api::testing::{check_compute, harmless_instance};
use plughost_api::{ComputeClient, Options};

#[test]
fn fake_compute_meets_the_compute_contract() {
    check_compute(
        &|| {
            let driver = fake_compute::FakeCompute::new(&Options::defaults(fake_compute::OPTIONS))?;
            Ok(Box::new(ComputeClient::in_process(driver)))
        },
        &harmless_instance(),
    )
    .assert_passed();
}
