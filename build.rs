//! Compiles `proto/` with protox (pure Rust: no protoc to install on any machine or in CI).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/loggregator-api/v2/envelope.proto",
        "proto/loggregator-api/v2/ingress.proto",
        // v1 (dropsonde), messages only. envelope.proto imports the rest, but each is listed so
        // that rerun-if-changed covers it.
        "proto/dropsonde/events/envelope.proto",
        "proto/dropsonde/events/error.proto",
        "proto/dropsonde/events/http.proto",
        "proto/dropsonde/events/log.proto",
        "proto/dropsonde/events/metric.proto",
        "proto/dropsonde/events/uuid.proto",
        // OTLP (proto/opentelemetry/README.md): the messages and the three export services.
        "proto/opentelemetry/proto/common/v1/common.proto",
        "proto/opentelemetry/proto/resource/v1/resource.proto",
        "proto/opentelemetry/proto/logs/v1/logs.proto",
        "proto/opentelemetry/proto/metrics/v1/metrics.proto",
        "proto/opentelemetry/proto/trace/v1/trace.proto",
        "proto/opentelemetry/proto/collector/logs/v1/logs_service.proto",
        "proto/opentelemetry/proto/collector/metrics/v1/metrics_service.proto",
        "proto/opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ];
    // No generator prints these itself: without them proto edits are silently ignored.
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Sorted maps make the signing form and the counter-total key deterministic for free.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
