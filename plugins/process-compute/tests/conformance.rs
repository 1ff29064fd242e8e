//! process-compute meets the compute contract with real processes (plughost-api's conformance suite,
//! through the stable-ABI glue).
use plughost_api::testing::{check_compute, harmless_instance};
use plughost_api::{ComputeClient, Options};

#[test]
fn process_compute_meets_the_compute_contract() {
    let dir = std::env::temp_dir().join(format!("process-compute-conformance-{}", std::process::id()));
    let report = check_compute(
        &|| {
            let options = Options::for_schema(process_compute::OPTIONS, [("log_dir", dir.to_str().unwrap_or(""))]);
            Ok(Box::new(ComputeClient::in_process(process_compute::ProcessCompute::new(&options)?)))
        },
        &harmless_instance(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    report.assert_passed();
}
