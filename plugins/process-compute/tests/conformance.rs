//! process-compute meets the compute contract with real processes (plughost-api's conformance suite,
//! through the stable-ABI glue), with its options as a host gives them (`log_dir` defaults to
//! `${state_dir}/instances/${backend}`).
use plughost_api::testing::{check_compute, harmless_instance, TestHost};
use plughost_api::ComputeClient;

#[test]
fn process_compute_meets_the_compute_contract() {
    let host = TestHost::new();
    check_compute(
        &|| {
            let options = host.options(process_compute::OPTIONS, &[])?;
            Ok(Box::new(ComputeClient::in_process(process_compute::ProcessCompute::new(&options)?)))
        },
        &harmless_instance(),
    )
    .assert_passed();
}
