//! `/livez` and `/readyz` follow the agent's real state, and `/metrics` is served over mTLS when
//! `metrics.tls` is set (and its certificates follow a reload).

mod common;

use std::time::Duration;

use common::agent::{unserved_addr, World};
use common::*;
use serde_json::Value as Json;

const STEP: Duration = Duration::from_secs(15);

/// GET `path` on the agent's health endpoint; (status, parsed JSON body).
async fn health(agent: &metron::Agent, path: &str) -> (u16, Json) {
    let addr = agent.health_addr().expect("health endpoint on");
    let (status, body) = http_get(addr, path).await.expect("health answers");
    let json: Json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, json)
}

/// Polls `/readyz` until it answers `want` (bounded by `STEP`); returns that body.
async fn readyz_becomes(agent: &metron::Agent, want: u16) -> Json {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, body) = health(agent, "/readyz").await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still {status}, not {want}: {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_doppler_streams() {
    let w = World::new();
    let doppler_addr = unserved_addr();
    let agent = w.start(&[(doppler_addr, "z1")], "");

    // No Doppler yet: alive, listening, not ready, and the body says why.
    let (status, live) = health(&agent, "/livez").await;
    assert_eq!(
        (status, live.get("status")),
        (200, Some(&Json::String("alive".into())))
    );
    let (status, body) = health(&agent, "/readyz").await;
    assert_eq!(status, 503, "{body:?}");
    assert_eq!(body.get("status").and_then(Json::as_str), Some("not_ready"));
    assert_eq!(
        body.get("ingress").and_then(Json::as_str),
        Some("listening")
    );
    assert_eq!(
        body.get("doppler_streams").and_then(Json::as_f64),
        Some(0.0)
    );
    assert_eq!(
        body.get("reasons"),
        Some(&Json::Array(vec![Json::String(
            "no destination has a connection open (no Doppler stream, no drain)".into()
        )]))
    );

    // The Doppler comes up: ready once the streams are open, with the connections per AZ.
    let mut doppler = FakeDoppler::start_on(&w.pki, doppler_addr);
    assert!(doppler.wait_for_streams_async(3, STEP).await);
    assert!(
        wait_until_async(STEP, || agent.metrics().doppler_v2_streams == 3).await,
        "{:?}",
        agent.metrics()
    );
    let body = readyz_becomes(&agent, 200).await;
    assert_eq!(body.get("status").and_then(Json::as_str), Some("ready"));
    let by_az = body.get("connections_by_az").expect("connections_by_az");
    assert_eq!(
        by_az.get("z1").and_then(Json::as_f64),
        Some(3.0),
        "{body:?}"
    );
    let dropped = body.get("dropped").expect("dropped");
    assert!(
        dropped.get("total").is_some() && dropped.get("no_doppler").is_some(),
        "{body:?}"
    );
    assert!(body
        .get("buffered")
        .and_then(|b| b.get("budget_bytes"))
        .is_some());

    // It goes away: not ready again.
    doppler.kill();
    let body = readyz_becomes(&agent, 503).await;
    assert_eq!(
        body.get("doppler_streams").and_then(Json::as_f64),
        Some(0.0)
    );

    let (status, _) = http_get(agent.health_addr().unwrap(), "/nope")
        .await
        .unwrap();
    assert_eq!(status, 404);
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_over_mtls_require_a_client_certificate_and_follow_a_reload() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let metrics_tls = |w: &World| {
        format!(
            "metrics:\n  listen: \"127.0.0.1:0\"\n  tls: {{ ca: {}, cert: {}, key: {} }}",
            w.pki.ca_path.display(),
            w.agent_cert.cert_path.display(),
            w.agent_cert.key_path.display()
        )
    };
    let yaml = w.yaml(&[(doppler.addr(), "z1")], "").replacen(
        "metrics:\n  listen: \"127.0.0.1:0\"",
        &metrics_tls(&w),
        1,
    );
    assert!(yaml.contains("  tls: { ca"), "{yaml}");
    let agent = metron::Agent::start(metron::config::Config::from_yaml(&yaml).unwrap()).unwrap();
    let addr = agent.metrics_addr().unwrap();

    let (status, body) = https_get(addr, &w.pki.ca_pem, Some(&w.client_cert), "/metrics")
        .await
        .expect("an mTLS scrape");
    assert_eq!(status, 200);
    assert!(body.contains("ingress{metric_version=\"2.0\"}"), "{body}");
    assert!(
        https_get(addr, &w.pki.ca_pem, None, "/metrics")
            .await
            .is_err(),
        "no client certificate, no metrics"
    );
    assert!(http_get(addr, "/metrics").await.is_err(), "no plain HTTP");

    // A new CA for the metrics endpoint: new scrapers need the new one, the old is refused.
    let pki2 = Pki::new();
    let server2 = pki2.issue("metron", &["metron"]);
    let scraper2 = pki2.issue("scraper", &["scraper"]);
    let rotated = yaml.replacen(
        &metrics_tls(&w),
        &format!(
            "metrics:\n  listen: \"127.0.0.1:0\"\n  tls: {{ ca: {}, cert: {}, key: {} }}",
            pki2.ca_path.display(),
            server2.cert_path.display(),
            server2.key_path.display()
        ),
        1,
    );
    let outcome = agent
        .reload(metron::config::Config::from_yaml(&rotated).unwrap())
        .await
        .expect("reload applies");
    assert_eq!(outcome.applied, vec!["metrics.tls"]);
    let (status, _) = https_get(addr, &pki2.ca_pem, Some(&scraper2), "/metrics")
        .await
        .expect("the new CA's scraper");
    assert_eq!(status, 200);
    assert!(
        https_get(addr, &w.pki.ca_pem, Some(&w.client_cert), "/metrics")
            .await
            .is_err(),
        "the old CA's scraper is refused"
    );
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_speak_http_and_bound_their_connections() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let addr = agent.health_addr().unwrap();

    // Keep-alive: three requests on one connection; HEAD answers without a body; other methods
    // are refused with the methods that work.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut client = http_client(stream).await.unwrap();
    let (status, _, body) = http_request(&mut client, "GET", "/livez").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, headers, body) = http_request(&mut client, "HEAD", "/livez").await.unwrap();
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(headers["content-type"], "application/json");
    let (status, headers, _) = http_request(&mut client, "POST", "/readyz").await.unwrap();
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "GET, HEAD");

    // At most MAX_CONNECTIONS at once: idle connections fill the endpoint, the next one is
    // closed at once, and once they go the endpoint answers again.
    let max = metron::telemetry::server::MAX_CONNECTIONS;
    let mut idle = Vec::new();
    for _ in 0..max - 1 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The keep-alive client above holds the last place.
    assert!(
        http_get(addr, "/livez").await.is_err(),
        "a connection beyond the bound is closed"
    );
    drop(idle);
    drop(client);
    let deadline = tokio::time::Instant::now() + STEP;
    let mut answered = false;
    while !answered && tokio::time::Instant::now() < deadline {
        answered = matches!(http_get(addr, "/livez").await, Ok((200, _)));
        // Polling until the agent has seen the closed connections go.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        answered,
        "the endpoint answers once the connections are gone"
    );
    agent.shutdown();
}
