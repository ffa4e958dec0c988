//! The syslog formatter against upstream's own vectors: every case of loggregator-agent-release's
//! `src/pkg/egress/syslog/rfc5424_test.go` (the envelopes its `buildLogEnvelope` and friends
//! build: timestamp 12,345,000 ns, source id `test-app-id`), and the outputs of upstream's real
//! converter recorded in the reference (`destinations.md` §1.4). Expected strings are copied, not
//! derived from metron's reading of the rules.

use std::collections::BTreeMap;

use metron::proto::envelope::Message;
use metron::proto::{Counter, Envelope, Event, Gauge, GaugeValue, Log, Timer};
use metron::syslog::rfc5424::{format, frame, Options, Unformattable};

const OUT: i32 = 0;
const ERR: i32 = 1;

fn opts(hostname: &str) -> Options<'_> {
    Options {
        hostname,
        metadata: true,
        metron_tag: false,
    }
}

fn envelope(instance: &str, message: Message) -> Envelope {
    Envelope {
        timestamp: 12_345_000,
        source_id: "test-app-id".into(),
        instance_id: instance.into(),
        message: Some(message),
        ..Default::default()
    }
}

/// upstream's `buildLogEnvelope(srcType, srcInstance, payload, logType)`.
fn log(source_type: &str, instance: &str, payload: &str, kind: i32) -> Envelope {
    let mut e = envelope(
        instance,
        Message::Log(Log {
            payload: payload.as_bytes().to_vec(),
            r#type: kind,
        }),
    );
    e.tags.insert("source_type".into(), source_type.into());
    e
}

fn counter() -> Envelope {
    envelope(
        "1",
        Message::Counter(Counter {
            name: "some-counter".into(),
            delta: 1,
            total: 99,
        }),
    )
}

fn one(e: &Envelope, o: &Options) -> String {
    let mut out = Vec::new();
    format(e, o, &mut out).expect("formats");
    assert_eq!(out.len(), 1);
    String::from_utf8(out.remove(0)).expect("UTF-8")
}

#[test]
fn logs_out_and_err() {
    assert_eq!(
        one(&log("MY TASK", "2", "just a test", OUT), &opts("test-hostname")),
        "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [MY-TASK/2] - [tags@47450 source_type=\"MY TASK\"] just a test\n"
    );
    assert_eq!(
        one(&log("MY TASK", "2", "just a test", ERR), &opts("test-hostname")),
        "<11>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [MY-TASK/2] - [tags@47450 source_type=\"MY TASK\"] just a test\n"
    );
}

/// Upstream writes PRI `-1`, which Log Cache's parser refuses, closing the connection.
#[test]
fn an_unknown_log_type_is_refused_rather_than_sent_with_pri_minus_one() {
    let mut out = Vec::new();
    let e = log("MY TASK", "2", "just a test", 20);
    assert_eq!(
        format(&e, &opts("h"), &mut out),
        Err(Unformattable::LogType(20))
    );
    assert!(out.is_empty());
}

#[test]
fn a_gauge_is_one_message_per_metric() {
    let metrics: BTreeMap<String, GaugeValue> = [
        ("cpu", 0.23, "percentage"),
        ("disk", 1234.0, "bytes"),
        ("disk_quota", 1024.0, "bytes"),
        ("memory", 5423.0, "bytes"),
        ("memory_quota", 8000.0, "bytes"),
    ]
    .into_iter()
    .map(|(n, v, u)| {
        (
            n.to_string(),
            GaugeValue {
                unit: u.into(),
                value: v,
            },
        )
    })
    .collect();
    let e = envelope("1", Message::Gauge(Gauge { metrics }));
    let mut out = Vec::new();
    format(&e, &opts("test-hostname"), &mut out).unwrap();
    let got: Vec<String> = out
        .into_iter()
        .map(|m| String::from_utf8(m).unwrap())
        .collect();
    assert_eq!(
        got,
        [
            "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [gauge@47450 name=\"cpu\" value=\"0.23\" unit=\"percentage\"] \n",
            "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [gauge@47450 name=\"disk\" value=\"1234\" unit=\"bytes\"] \n",
            "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [gauge@47450 name=\"disk_quota\" value=\"1024\" unit=\"bytes\"] \n",
            "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [gauge@47450 name=\"memory\" value=\"5423\" unit=\"bytes\"] \n",
            "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [gauge@47450 name=\"memory_quota\" value=\"8000\" unit=\"bytes\"] \n",
        ]
    );
}

#[test]
fn counter_timer_and_event() {
    assert_eq!(
        one(&counter(), &opts("test-hostname")),
        "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [counter@47450 name=\"some-counter\" total=\"99\" delta=\"1\"] \n"
    );
    let timer = envelope(
        "1",
        Message::Timer(Timer {
            name: "http".into(),
            start: 10,
            stop: 20,
        }),
    );
    assert_eq!(
        one(&timer, &opts("test-hostname")),
        "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [timer@47450 name=\"http\" start=\"10\" stop=\"20\"] \n"
    );
    let event = envelope(
        "1",
        Message::Event(Event {
            title: "event-title".into(),
            body: "event-body".into(),
        }),
    );
    assert_eq!(
        one(&event, &opts("test-hostname")),
        "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [event@47450 title=\"event-title\" body=\"event-body\"] \n"
    );
}

#[test]
fn tags_escaped_and_omitted() {
    let mut l = log("MY TASK", "2", "just a test", ERR);
    l.tags.insert("log-tag".into(), "oyster".into());
    let mut c = counter();
    c.tags.insert("metric-tag".into(), "scallop".into());
    assert_eq!(
        one(&l, &opts("test-hostname")),
        "<11>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [MY-TASK/2] - [tags@47450 log-tag=\"oyster\" source_type=\"MY TASK\"] just a test\n"
    );
    assert_eq!(
        one(&c, &opts("test-hostname")),
        "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [counter@47450 name=\"some-counter\" total=\"99\" delta=\"1\"][tags@47450 metric-tag=\"scallop\"] \n"
    );
    let off = Options {
        metadata: false,
        ..opts("test-hostname")
    };
    assert_eq!(
        one(&l, &off),
        "<11>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [MY-TASK/2] - - just a test\n"
    );
    assert_eq!(
        one(&c, &off),
        "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [counter@47450 name=\"some-counter\" total=\"99\" delta=\"1\"] \n"
    );
    l.tags.insert("log-tag".into(), "\"]\\".into());
    c.tags.insert("metric-tag".into(), "\"]\\".into());
    assert_eq!(
        one(&l, &opts("test-hostname")),
        "<11>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [MY-TASK/2] - [tags@47450 log-tag=\"\\\"\\]\\\\\" source_type=\"MY TASK\"] just a test\n"
    );
    assert_eq!(
        one(&c, &opts("test-hostname")),
        "<14>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [1] - [counter@47450 name=\"some-counter\" total=\"99\" delta=\"1\"][tags@47450 metric-tag=\"\\\"\\]\\\\\"] \n"
    );
}

#[test]
fn hostname_from_org_space_and_app_tags() {
    let with = |org: &str, space: &str, app: &str| {
        let mut l = log("MY TASK", "2", "just a test", ERR);
        l.tags.insert("organization_name".into(), org.into());
        l.tags.insert("space_name".into(), space.into());
        l.tags.insert("app_name".into(), app.into());
        one(&l, &opts("test-hostname"))
    };
    assert_eq!(
        with("some-org", "some-space", "some-app"),
        "<11>1 1970-01-01T00:00:00.012345+00:00 some-org.some-space.some-app test-app-id [MY-TASK/2] - [tags@47450 app_name=\"some-app\" organization_name=\"some-org\" source_type=\"MY TASK\" space_name=\"some-space\"] just a test\n"
    );
    assert_eq!(
        with("some_org", "some space", "some_app--"),
        "<11>1 1970-01-01T00:00:00.012345+00:00 someorg.some-space.someapp test-app-id [MY-TASK/2] - [tags@47450 app_name=\"some_app--\" organization_name=\"some_org\" source_type=\"MY TASK\" space_name=\"some space\"] just a test\n"
    );
    let (a, b, c) = ("a".repeat(100), "b".repeat(100), "c".repeat(100));
    assert_eq!(
        with(&a, &b, &c),
        format!(
            "<11>1 1970-01-01T00:00:00.012345+00:00 {}.{}.{} test-app-id [MY-TASK/2] - [tags@47450 app_name=\"{c}\" organization_name=\"{a}\" source_type=\"MY TASK\" space_name=\"{b}\"] just a test\n",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63)
        )
    );
}

#[test]
fn procid_is_sanitized() {
    let mut l = log("MY TASK", "2", "just a test", ERR);
    l.tags
        .insert("source_type".into(), "TASK/こんにちは".into());
    assert_eq!(
        one(&l, &opts("test-hostname")),
        "<11>1 1970-01-01T00:00:00.012345+00:00 test-hostname test-app-id [TASK//2] - [tags@47450 source_type=\"TASK/こんにちは\"] just a test\n"
    );
}

#[test]
fn hostname_and_app_name_are_truncated() {
    let e = log("MY TASK", "2", "just a test", OUT);
    assert_eq!(
        one(&e, &opts(&"A".repeat(300))),
        format!(
            "<14>1 1970-01-01T00:00:00.012345+00:00 {} test-app-id [MY-TASK/2] - [tags@47450 source_type=\"MY TASK\"] just a test\n",
            "A".repeat(255)
        )
    );
    let mut e = e;
    e.source_id = "A".repeat(300);
    assert_eq!(
        one(&e, &opts("host")),
        format!(
            "<14>1 1970-01-01T00:00:00.012345+00:00 host {} [MY-TASK/2] - [tags@47450 source_type=\"MY TASK\"] just a test\n",
            "A".repeat(48)
        )
    );
}

/// upstream's PROCID truncation table: (source type, instance, expected PROCID).
#[test]
fn procid_truncation_matches_upstream() {
    let uuid = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d";
    let longer = format!("{uuid}-{uuid}");
    let a = |n: usize| "A".repeat(n);
    let mut cases: Vec<(String, String, String)> = vec![
        (a(127), String::new(), format!("[{}]", a(126))),
        (
            a(126),
            "B".repeat(36),
            format!("[{}/{}]", a(89), "B".repeat(36)),
        ),
    ];
    for (t, i) in [
        (124, 1),
        (123, 2),
        (66, 59),
        (65, 60),
        (64, 61),
        (63, 62),
        (62, 63),
        (3, 122),
        (4, 121),
        (5, 120),
        (1, 124),
        (100, 20),
        (60, 40),
        (20, 100),
        (10, 50),
    ] {
        cases.push((a(t), "B".repeat(i), format!("[{}/{}]", a(t), "B".repeat(i))));
    }
    for (t, i, want) in [
        (a(128), "B".to_string(), format!("[{}/B]", a(124))),
        (a(127), "B".to_string(), format!("[{}/B]", a(124))),
        (a(126), "B".to_string(), format!("[{}/B]", a(124))),
        (a(125), "B".to_string(), format!("[{}/B]", a(124))),
        (a(124), uuid.to_string(), format!("[{}/{uuid}]", a(89))),
        (a(128), uuid.to_string(), format!("[{}/{uuid}]", a(89))),
        (a(180), uuid.to_string(), format!("[{}/{uuid}]", a(89))),
        (a(180), "12".to_string(), format!("[{}/12]", a(123))),
        (a(180), "1212".to_string(), format!("[{}/1212]", a(121))),
        (a(66), longer.clone(), format!("[{}/{uuid}]", a(66))),
        (a(89), longer.clone(), format!("[{}/{uuid}]", a(89))),
        (a(90), longer.clone(), format!("[{}/{uuid}]", a(89))),
        (a(100), longer.clone(), format!("[{}/{uuid}]", a(89))),
    ] {
        cases.push((t, i, want));
    }
    for (source_type, instance, procid) in cases {
        let e = log(&source_type, &instance, "just a test", OUT);
        assert_eq!(
            one(&e, &opts("host")),
            format!(
                "<14>1 1970-01-01T00:00:00.012345+00:00 host test-app-id {procid} - [tags@47450 source_type=\"{source_type}\"] just a test\n"
            ),
            "{} / {}",
            source_type.len(),
            instance.len()
        );
    }
    // The longest valid task name does not panic.
    let e = log(&format!("APP/TASK/{}", a(255)), "0", "just a test", OUT);
    let mut out = Vec::new();
    assert!(format(&e, &opts("host"), &mut out).is_ok());
}

#[test]
fn an_app_name_that_is_not_printable_is_refused() {
    let mut e = log("MY TASK", "2", "just a test", OUT);
    e.source_id = "   ".into();
    assert_eq!(
        format(&e, &opts("test-hostname"), &mut Vec::new()),
        Err(Unformattable::NotPrintable("APP-NAME"))
    );
}

/// The outputs of upstream's real converter, recorded in the reference (§1.4).
#[test]
fn outputs_of_the_real_upstream_converter() {
    let ts = 1_796_560_201_000_000_000; // 2026-12-06T12:30:01Z
    let mut e = log("APP/PROC/WEB", "0", "hello\0 world", OUT);
    e.timestamp = ts;
    e.source_id = "app-guid".into();
    e.tags.insert("a".into(), "x\"y]z\\".into());
    assert_eq!(
        one(&e, &opts("org.space.app")),
        "<14>1 2026-12-06T12:30:01+00:00 org.space.app app-guid [APP/PROC/WEB/0] - [tags@47450 a=\"x\\\"y\\]z\\\\\" source_type=\"APP/PROC/WEB\"] hello world\n"
    );
    let mut e = envelope(
        "",
        Message::Log(Log {
            payload: b"err".to_vec(),
            r#type: ERR,
        }),
    );
    e.timestamp = ts + 123_456_789;
    e.source_id = String::new();
    assert_eq!(
        one(&e, &opts("org.space.app")),
        "<11>1 2026-12-06T12:30:01.123456+00:00 org.space.app - [] - - err\n"
    );
    let mut e = envelope(
        "",
        Message::Gauge(Gauge {
            metrics: [(
                "memory".to_string(),
                GaugeValue {
                    unit: "bytes".into(),
                    value: 123_456_789.0,
                },
            )]
            .into(),
        }),
    );
    e.timestamp = ts + 100_000_000;
    e.source_id = "rep".into();
    e.tags.insert("deployment".into(), "cf".into());
    assert_eq!(
        one(&e, &opts("org.space.app")),
        "<14>1 2026-12-06T12:30:01.1+00:00 org.space.app rep [] - [gauge@47450 name=\"memory\" value=\"1.23456789e+08\" unit=\"bytes\"][tags@47450 deployment=\"cf\"] \n"
    );
    let mut e = envelope(
        "3",
        Message::Counter(Counter {
            name: "requests".into(),
            delta: 2,
            total: 40,
        }),
    );
    e.timestamp = ts + 1_000;
    e.source_id = "app-guid".into();
    for (k, v) in [
        ("app_name", "web app--"),
        ("organization_name", "My Org"),
        ("space_name", "dev_1"),
    ] {
        e.tags.insert(k.into(), v.into());
    }
    assert_eq!(
        one(&e, &opts("ignored")),
        "<14>1 2026-12-06T12:30:01.000001+00:00 My-Org.dev1.web-app app-guid [3] - [counter@47450 name=\"requests\" total=\"40\" delta=\"2\"][tags@47450 app_name=\"web app--\" organization_name=\"My Org\" space_name=\"dev_1\"] \n"
    );
}

#[test]
fn the_metron_tag_stays_out_unless_asked_for() {
    let mut e = counter();
    e.tags.insert("metron".into(), "2k.abc".into());
    assert!(!one(&e, &opts("h")).contains("metron="));
    let with = Options {
        metron_tag: true,
        ..opts("h")
    };
    assert!(one(&e, &with).contains("[tags@47450 metron=\"2k.abc\"]"));
}

#[test]
fn octet_counting_frames_count_the_newline() {
    let mut out = Vec::new();
    frame(b"<14>1 x\n", &mut out);
    assert_eq!(out, b"8 <14>1 x\n");
}
