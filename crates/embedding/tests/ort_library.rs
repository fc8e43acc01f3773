//! A wrong ONNX Runtime library is a clear start-up error, not a panic. Its
//! own test binary: ort keeps the first library a process loads.

mod common;

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_onnx_runtime_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a shared library").unwrap();
    let mut config = common::config();
    config.models.ort_library = fake.to_str().unwrap().into();
    let error = berth_embedding::start(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("ONNX Runtime library") && error.contains(fake.to_str().unwrap()),
        "{error}"
    );

    // Named explicitly and absent: an error too, naming the path.
    let mut config = common::config();
    config.models.ort_library = dir.path().join("nope.so").to_str().unwrap().into();
    let error = berth_embedding::start(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("nope.so"), "{error}");
}
