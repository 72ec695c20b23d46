//! The inference server (`ferrotune serve`): answers equal the library's predictions,
//! batched or not, for texts and for images (base64 JSON, multipart, raw bodies); every
//! error status has a JSON body; SIGTERM drains requests in flight.
//!
//! Routes are exercised in process with `tower::ServiceExt::oneshot` (no sockets), except
//! the shutdown test, which talks HTTP/1.1 over a real socket and sends a real SIGTERM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use ferrotune::data::reader::Example;
use ferrotune::families;
use ferrotune::precision::Precision;
use ferrotune::predict::Predictor;
use ferrotune::serve::{shutdown_signal, ServeConfig, Server};
use ferrotune::testing::{
    write_tiny_classifier, write_tiny_image_classifier, TINY_IMAGE_SIDE, TINY_WORDS,
};
use serde_json::{json, Value};
use tower::ServiceExt;

const MAX_LEN: usize = 16;

/// A random 3-label classifier exported as `ferrotune train` would (max length 16).
fn tiny_classifier(dir: &Path) -> PathBuf {
    tiny_model(dir, "single_label_classification")
}

/// A random 3-output BERT of `problem_type`.
fn tiny_model(dir: &Path, problem_type: &str) -> PathBuf {
    tiny_model_of(dir, "bert", problem_type)
}

/// A random 3-output model of `family` and `problem_type`, exported as `ferrotune train`
/// would (labels neg, neu, pos; max length 16).
fn tiny_model_of(dir: &Path, family: &'static str, problem_type: &str) -> PathBuf {
    write_tiny_classifier(dir, family, problem_type, MAX_LEN).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_classifier(dir.path());
    Fixture { _dir: dir, model }
}

fn server(f: &Fixture, cfg: ServeConfig) -> Server {
    Server::new(Predictor::load(&f.model).unwrap(), cfg).unwrap()
}

/// A text of `n` words (one token each) from the tiny vocabulary, starting at word `k`.
fn text(k: usize, n: usize) -> String {
    let words: Vec<&str> = TINY_WORDS.iter().copied().filter(|w| *w != "##s").collect();
    (0..n)
        .map(|i| words[(k + 3 * i) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn example(text: &str, pair: Option<&str>) -> Example {
    Example {
        id: "x".into(),
        line: 0,
        text: text.into(),
        text_pair: pair.map(String::from),
        label: None,
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts a TEI error body of `status` and `error_type` whose message has `needle`.
    fn assert_error(&self, status: StatusCode, error_type: &str, needle: &str) {
        let v = self.json();
        assert_eq!(self.status, status, "{v}");
        assert_eq!(v["error_type"], error_type, "{v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(needle), "`{needle}` not in `{msg}`");
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/json",
            "{v}"
        );
    }
}

async fn call(app: &Router, method: &str, uri: &str, body: impl Into<Body>) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn predict(app: &Router, body: Value) -> Answer {
    call(app, "POST", "/predict", body.to_string()).await
}

/// `[{label, score}, ...]` → scores in label order.
fn by_label(list: &Value, labels: &[String]) -> Vec<f32> {
    let items = list.as_array().unwrap();
    assert_eq!(items.len(), labels.len());
    let scores: Vec<f64> = items.iter().map(|i| i["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "not sorted: {list}"
    );
    labels
        .iter()
        .map(|l| {
            let i = items.iter().find(|i| i["label"] == l.as_str()).unwrap();
            i["score"].as_f64().unwrap() as f32
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-5, "{got:?} vs {want:?}");
    }
}

/// Sum over a histogram's buckets with `le` at most `le`, and its count, from /metrics.
fn hist(metrics: &str, name: &str, le: &str) -> (u64, u64) {
    let get = |key: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .unwrap_or_else(|| panic!("{key} missing from:\n{metrics}"))
    };
    (
        get(&format!("{name}_bucket{{le=\"{le}\"}} ")),
        get(&format!("{name}_count ")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_equal_the_librarys_predictions() {
    let f = fixture();
    let p = Predictor::load(&f.model).unwrap();
    let s = server(&f, ServeConfig::default());
    let app = s.router();

    // A single string: one list, every label, highest first.
    let t = text(0, 5);
    let a = predict(&app, json!({"inputs": t})).await;
    assert_eq!(a.status, StatusCode::OK);
    let want = p.predict_probs(&[example(&t, None)], |_| {}).unwrap();
    assert_close(&by_label(&a.json(), &p.labels), &want[0]);

    // A list of texts and pairs: a list of lists, in order; raw scores are the logits.
    let (t1, t2, t3) = (text(1, 3), text(2, 30), text(4, 6));
    let a = predict(
        &app,
        json!({"inputs": [t1, t2, [t3, t1]], "raw_scores": true}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    assert_eq!(v.as_array().unwrap().len(), 3);
    for (i, ex) in [
        example(&t1, None),
        example(&t2, None),
        example(&t3, Some(&t1)),
    ]
    .iter()
    .enumerate()
    {
        let want = p.predict_logits(std::slice::from_ref(ex), |_| {}).unwrap();
        assert_close(&by_label(&v[i], &p.labels), &want[0]);
    }

    // A request over `max_batch_tokens` on its own still runs (alone).
    let small = server(
        &f,
        ServeConfig {
            max_batch_tokens: 1,
            ..Default::default()
        },
    );
    let a = predict(&small.router(), json!({"inputs": [t1, t2]})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_label_and_regression_scores_are_the_librarys() {
    for problem_type in ["multi_label_classification", "regression"] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path(), problem_type);
        let p = Predictor::load(&model).unwrap();
        let s = Server::new(Predictor::load(&model).unwrap(), ServeConfig::default()).unwrap();
        let t = text(2, 7);
        let a = predict(&s.router(), json!({ "inputs": [t] })).await;
        assert_eq!(a.status, StatusCode::OK);
        let want = p.predict_probs(&[example(&t, None)], |_| {}).unwrap();
        assert_close(&by_label(&a.json()[0], &p.labels), &want[0]);
        if problem_type == "multi_label_classification" {
            // One sigmoid per label: in (0, 1), not summing to 1.
            assert!(want[0].iter().all(|&x| x > 0.0 && x < 1.0));
            assert!((want[0].iter().sum::<f32>() - 1.0).abs() > 1e-3);
        }
    }
}

/// Every family's server answers as its predictor, for every task type, text pairs
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_serves_the_librarys_predictions() {
    for family in families::text_families() {
        for problem_type in [
            "single_label_classification",
            "multi_label_classification",
            "regression",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let model = tiny_model_of(dir.path(), family.model_type(), problem_type);
            let p = Predictor::load(&model).unwrap();
            assert_eq!(p.family.model_type(), family.model_type());
            let s = Server::new(Predictor::load(&model).unwrap(), ServeConfig::default()).unwrap();
            let (t1, t2) = (text(2, 7), text(5, 3));
            let a = predict(&s.router(), json!({ "inputs": [t1, [t2, t1]] })).await;
            assert_eq!(a.status, StatusCode::OK, "{}", family.name());
            let v = a.json();
            let ex = [example(&t1, None), example(&t2, Some(&t1))];
            let want = p.predict_probs(&ex, |_| {}).unwrap();
            for (i, w) in want.iter().enumerate() {
                assert_close(&by_label(&v[i], &p.labels), w);
            }
            let info = call(&s.router(), "GET", "/info", "").await.json();
            assert_eq!(info["model_type"], family.model_type());
        }
    }
}

/// An export whose maximum length its positions cannot hold, or too short for the special
/// tokens, is refused at load, naming the field (the server would otherwise feed the model
/// sequences it cannot take).
#[test]
fn export_with_an_impossible_max_seq_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_classifier(dir.path());
    let cfg_path = model.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    for (len, want) in [(1000, "ferrotune.max_seq_length"), (2, "too short")] {
        let mut cfg = original.clone();
        cfg["ferrotune"]["max_seq_length"] = json!(len);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let e = Predictor::load(&model).err().expect("loaded").to_string();
        assert!(e.contains(want), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors() {
    let f = fixture();
    let s = server(
        &f,
        ServeConfig {
            max_inputs_per_request: 2,
            max_body_bytes: 512,
            ..Default::default()
        },
    );
    let app = s.router();
    let long = text(0, 40);

    // 400: not JSON.
    call(&app, "POST", "/predict", "{\"inputs\": ")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "validation", "not valid JSON");
    call(&app, "POST", "/predict", "").await.assert_error(
        StatusCode::BAD_REQUEST,
        "validation",
        "not valid JSON",
    );
    // 422: JSON of the wrong shape.
    for (body, needle) in [
        (json!({"inputs": 3}), "not a number"),
        (json!({"input": "x"}), "unknown field `input`"),
        (json!({"raw_scores": true}), "missing field `inputs`"),
        (json!({"inputs": []}), "empty list"),
        (json!({"inputs": ["a", ["b"]]}), "inputs[1]"),
        (
            json!({"inputs": "a", "truncate": 1}),
            "`truncate` must be a boolean",
        ),
        (json!({"inputs": "a", "raw_scores": "no"}), "`raw_scores`"),
        (json!(["a"]), "JSON object"),
    ] {
        predict(&app, body).await.assert_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            needle,
        );
    }
    // 413: body, number of inputs, input length (when the request asks not to truncate).
    let big = json!({ "inputs": "the ".repeat(200) }).to_string();
    call(&app, "POST", "/predict", big).await.assert_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "validation",
        "512 bytes",
    );
    predict(&app, json!({"inputs": ["a", "b", "c"]}))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "validation", "3 inputs");
    let a = predict(&app, json!({"inputs": ["good", long], "truncate": false})).await;
    a.assert_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "validation",
        "inputs[1] is 42 tokens",
    );
    assert!(a.json()["error"]
        .as_str()
        .unwrap()
        .contains("maximum of 16"));
    predict(&app, json!({"inputs": [["good", long]], "truncate": false}))
        .await
        .assert_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "validation",
            "inputs[0] is 44 tokens",
        );
    // ... which truncation (the default) accepts; an input of exactly 16 tokens fits.
    let a = predict(&app, json!({"inputs": long})).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = predict(&app, json!({"inputs": text(0, 14), "truncate": false})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json());
    // 404, 405.
    call(&app, "GET", "/nope", "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found", "/nope");
    let a = call(&app, "GET", "/predict", "").await;
    a.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "POST");
    assert_eq!(a.headers[header::ALLOW], "POST");
    call(&app, "POST", "/health", "").await.assert_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "GET",
    );

    // Every answer was counted by status; no 5xx.
    let m = String::from_utf8(call(&app, "GET", "/metrics", "").await.body).unwrap();
    for status in [400, 413, 422, 405] {
        let line = format!("ferrotune_requests_total{{path=\"/predict\",status=\"{status}\"}}");
        assert!(m.contains(&line), "{line} missing:\n{m}");
    }
    assert!(!m.contains("status=\"5"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_concurrent_requests_is_429_and_slow_ones_503() {
    let f = fixture();
    // The worker waits 800 ms for a batch to fill, so the first request stays in flight.
    let s = server(
        &f,
        ServeConfig {
            max_concurrent_requests: 1,
            batch_wait: Duration::from_millis(800),
            ..Default::default()
        },
    );
    let app = s.router();
    let first = tokio::spawn({
        let app = app.clone();
        async move { predict(&app, json!({"inputs": "good"})).await }
    });
    // Once it holds the only permit, the next one is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8(call(&app, "GET", "/metrics", "").await.body)
        .unwrap()
        .contains("ferrotune_requests_in_flight 1\n")
    {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let a = predict(&app, json!({"inputs": "bad"})).await;
    a.assert_error(StatusCode::TOO_MANY_REQUESTS, "overloaded", "limit is 1");
    assert_eq!(a.headers[header::RETRY_AFTER], "1");
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    // The permit is back.
    assert_eq!(
        predict(&app, json!({"inputs": "bad"})).await.status,
        StatusCode::OK
    );

    let s = server(
        &f,
        ServeConfig {
            request_timeout: Duration::from_millis(100),
            batch_wait: Duration::from_millis(2000),
            ..Default::default()
        },
    );
    let app = s.router();
    let start = Instant::now();
    let a = predict(&app, json!({"inputs": "good"})).await;
    a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "timeout", "100 ms");
    assert_eq!(a.headers[header::RETRY_AFTER], "1");
    assert!(start.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_answered_as_alone() {
    let f = fixture();
    let p = Predictor::load(&f.model).unwrap();
    // Inputs of many lengths (some over the maximum), one or two per request.
    let requests: Vec<Vec<String>> = (0..48)
        .map(|i| {
            let mut r = vec![text(i, 1 + (i * 7) % 20)];
            if i % 5 == 0 {
                r.push(text(i + 1, 2 + i % 9));
            }
            r
        })
        .collect();
    let want: Vec<Vec<Vec<f32>>> = requests
        .iter()
        .map(|r| {
            r.iter()
                .map(|t| p.predict_probs(&[example(t, None)], |_| {}).unwrap()[0].clone())
                .collect()
        })
        .collect();

    for (cfg, batched) in [
        // A short wait makes the batches certain; without it they depend on timing.
        (
            ServeConfig {
                max_batch_requests: 16,
                batch_wait: Duration::from_millis(50),
                ..Default::default()
            },
            true,
        ),
        (ServeConfig::default(), false),
        (
            ServeConfig {
                max_batch_requests: 1,
                batch_wait: Duration::from_millis(5),
                ..Default::default()
            },
            false,
        ),
    ] {
        let one_at_a_time = cfg.max_batch_requests == 1;
        let s = server(&f, cfg);
        let app = s.router();
        let tasks: Vec<_> = requests
            .iter()
            .map(|r| {
                let app = app.clone();
                let body = json!({ "inputs": r });
                tokio::spawn(async move { predict(&app, body).await })
            })
            .collect();
        for (task, want) in tasks.into_iter().zip(&want) {
            let a = task.await.unwrap();
            assert_eq!(a.status, StatusCode::OK);
            let v = a.json();
            assert_eq!(v.as_array().unwrap().len(), want.len());
            for (got, want) in v.as_array().unwrap().iter().zip(want) {
                assert_close(&by_label(got, &p.labels), want);
            }
        }
        let m = String::from_utf8(call(&app, "GET", "/metrics", "").await.body).unwrap();
        let (alone, batches) = hist(&m, "ferrotune_batch_requests", "1");
        if batched {
            assert!(alone < batches, "no batch of more than one request:\n{m}");
            let (le16, _) = hist(&m, "ferrotune_batch_requests", "16");
            assert_eq!(le16, batches, "a batch over max_batch_requests:\n{m}");
        }
        if one_at_a_time {
            assert_eq!(alone, batches, "batched despite max_batch_requests = 1");
            assert_eq!(batches, 48);
        }
        let inputs: usize = requests.iter().map(Vec::len).sum();
        assert!(
            m.contains(&format!("ferrotune_inputs_total {inputs}\n")),
            "{m}"
        );
        assert!(m.contains("ferrotune_queue_depth 0\n"), "{m}");
        assert!(m.contains("ferrotune_requests_in_flight 0\n"), "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_info_metrics_and_openapi() {
    let f = fixture();
    let s = server(&f, ServeConfig::default());
    let app = s.router();
    let a = call(&app, "GET", "/health", "").await;
    assert_eq!(
        (a.status, a.json()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let info = call(&app, "GET", "/info", "").await.json();
    assert_eq!(info["labels"], json!(["neg", "neu", "pos"]));
    assert_eq!(info["max_input_length"], MAX_LEN);
    assert_eq!(info["problem_type"], "single_label_classification");
    assert_eq!(info["max_batch_requests"], 64);
    let a = call(&app, "GET", "/metrics", "").await;
    assert!(a.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let m = String::from_utf8(a.body).unwrap();
    for name in [
        "ferrotune_requests_total",
        "ferrotune_request_duration_seconds_bucket",
        "ferrotune_batch_size_bucket",
        "ferrotune_queue_depth",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
    let api = call(&app, "GET", "/openapi.json", "").await.json();
    assert_eq!(api["openapi"], "3.0.3");
    for path in ["/predict", "/health", "/info", "/metrics", "/openapi.json"] {
        assert!(api["paths"].get(path).is_some(), "{path}");
    }
    // Every error_type the server can answer is documented.
    let types = api["components"]["schemas"]["Error"]["properties"]["error_type"]["enum"].clone();
    assert_eq!(types.as_array().unwrap().len(), 8);
}

/// Sends a hand-written HTTP/1.1 request; returns the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut res = String::new();
    s.read_to_string(&mut res).unwrap();
    let status = res
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = res
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn sigterm_drains_requests_in_flight_then_stops() {
    let f = fixture();
    let p = Predictor::load(&f.model).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The worker waits up to 5 s for a batch to fill: the request is in flight when SIGTERM
    // comes (sent as soon as the server counts it in flight); shutting down, the worker
    // stops waiting and answers it at once.
    let s = server(
        &f,
        ServeConfig {
            batch_wait: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let (listener, signal) = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // Installs the handlers now, before the signal is sent.
        (l, shutdown_signal().unwrap())
    });
    let addr = listener.local_addr().unwrap();
    let served = rt.spawn(s.serve(listener, signal));

    let t = text(3, 6);
    let body = json!({ "inputs": t }).to_string();
    let client = std::thread::spawn(move || http(addr, "POST", "/predict", &body));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http(addr, "GET", "/metrics", "")
        .1
        .contains("ferrotune_requests_in_flight 1\n")
    {
        assert!(Instant::now() < deadline, "the request never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting connections after SIGTERM"
    );

    let (status, body) = client.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let want = p.predict_probs(&[example(&t, None)], |_| {}).unwrap();
    assert_close(&by_label(&v, &p.labels), &want[0]);

    let stopped = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), served).await })
        .expect("did not stop after draining");
    stopped.unwrap().unwrap();
    // Well before the batch wait would have run out.
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_server_answers_as_the_int8_library() {
    let f = fixture();
    let mut p = Predictor::load(&f.model).unwrap();
    p.precision = Precision::Int8;
    let s = server(
        &f,
        ServeConfig {
            precision: Precision::Int8,
            ..Default::default()
        },
    );
    let t = text(0, 7);
    let a = predict(&s.router(), json!({"inputs": t})).await;
    assert_eq!(a.status, StatusCode::OK);
    let want = p.predict_probs(&[example(&t, None)], |_| {}).unwrap();
    assert_close(&by_label(&a.json(), &p.labels), &want[0]);
    // And not as the f32 one, exactly (the int8 path ran).
    p.precision = Precision::F32;
    let f32_probs = p.predict_probs(&[example(&t, None)], |_| {}).unwrap();
    assert_ne!(by_label(&a.json(), &p.labels), f32_probs[0]);
}

// ---- Image models ----------------------------------------------------------------------

/// A random 3-label image classifier (labels a, b, c; input 16×16) and a few images of
/// other sizes as PNG files, and one as JPEG.
struct ImageFixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    files: Vec<PathBuf>,
}

/// A `w × h` RGB image of a seeded pattern, encoded as `format`.
fn image_bytes(w: u32, h: u32, seed: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = x.wrapping_mul(31) ^ y.wrapping_mul(17) ^ seed.wrapping_mul(101);
        image::Rgb([(v % 251) as u8, (v / 3 % 241) as u8, (v / 7 % 239) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
    out
}

fn image_fixture() -> ImageFixture {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_image_classifier(dir.path()).unwrap();
    let mut files = Vec::new();
    for (i, (w, h)) in [(20u32, 14u32), (12, 12), (33, 40)].into_iter().enumerate() {
        let p = dir.path().join(format!("img{i}.png"));
        let bytes = image_bytes(w, h, i as u32, image::ImageFormat::Png);
        std::fs::write(&p, bytes).unwrap();
        files.push(p);
    }
    let jpg = dir.path().join("img3.jpg");
    std::fs::write(&jpg, image_bytes(24, 18, 3, image::ImageFormat::Jpeg)).unwrap();
    files.push(jpg);
    ImageFixture { dir, model, files }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A request with `content_type`.
async fn call_as(app: &Router, content_type: &str, body: impl Into<Body>) -> Answer {
    let req = Request::builder()
        .method("POST")
        .uri("/predict")
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

const BOUNDARY: &str = "ferrotune-test-boundary";

/// A form part: field name, file name, content type, bytes.
type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// A multipart/form-data body of `parts`.
fn form(parts: &[Part]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, file, ct, bytes) in parts {
        out.extend(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"").bytes(),
        );
        if let Some(f) = file {
            out.extend(format!("; filename=\"{f}\"").bytes());
        }
        out.extend(b"\r\n");
        if let Some(ct) = ct {
            out.extend(format!("Content-Type: {ct}\r\n").bytes());
        }
        out.extend(b"\r\n");
        out.extend_from_slice(bytes);
        out.extend(b"\r\n");
    }
    out.extend(format!("--{BOUNDARY}--\r\n").bytes());
    out
}

async fn post_form(app: &Router, parts: &[Part<'_>]) -> Answer {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    call_as(app, &ct, form(parts)).await
}

impl Answer {
    /// Asserts an error as [`Answer::assert_error`] does, its message one line.
    fn assert_one_line_error(&self, status: StatusCode, needle: &str) {
        self.assert_error(status, "validation", needle);
        let v = self.json();
        let msg = v["error"].as_str().unwrap();
        assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg}");
    }
}

/// Base64 in JSON (plain, data URL, lists), multipart parts and a raw image/* body give
/// what the library's predictor (`ferrotune predict`'s path) gives for the same files; a
/// list of images runs as one batch, and concurrent requests are batched together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_model_answers_as_the_librarys_predictions() {
    let f = image_fixture();
    let p = Predictor::load(&f.model).unwrap();
    let files: Vec<Example> = f
        .files
        .iter()
        .map(|p| example(p.to_str().unwrap(), None))
        .collect();
    let want = p.predict_probs(&files, |_| {}).unwrap();
    let logits = p.predict_logits(&files, |_| {}).unwrap();
    let bytes: Vec<Vec<u8>> = f.files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let s = Server::new(Predictor::load(&f.model).unwrap(), ServeConfig::default()).unwrap();
    let app = s.router();

    // One base64 string: one list.
    let a = predict(&app, json!({ "inputs": b64(&bytes[0]) })).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_close(&by_label(&a.json(), &p.labels), &want[0]);

    // A list, data URLs and plain mixed: one list per image, in order, one batch of 4.
    let list = json!({ "inputs": [
        format!("data:image/png;base64,{}", b64(&bytes[0])),
        b64(&bytes[1]),
        b64(&bytes[2]),
        format!("data:image/jpeg;base64,{}", b64(&bytes[3])),
    ]});
    let a = predict(&app, list).await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    assert_eq!(v.as_array().unwrap().len(), 4);
    for (i, w) in want.iter().enumerate() {
        assert_close(&by_label(&v[i], &p.labels), w);
    }
    let m = String::from_utf8(call(&app, "GET", "/metrics", "").await.body).unwrap();
    assert!(m.contains("ferrotune_batch_size_sum 5\n"), "{m}");
    assert!(m.contains("ferrotune_batch_size_count 2\n"), "{m}");

    // Multipart: any field names, in order; one part answers one list; raw_scores.
    let a = post_form(
        &app,
        &[
            ("b", Some("two.png"), Some("image/png"), &bytes[2]),
            ("file", Some("one.png"), None, &bytes[1]),
        ],
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let v = a.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_close(&by_label(&v[0], &p.labels), &want[2]);
    assert_close(&by_label(&v[1], &p.labels), &want[1]);
    let a = post_form(
        &app,
        &[
            ("raw_scores", None, None, b"true"),
            ("image", None, Some("image/jpeg"), &bytes[3]),
        ],
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_close(&by_label(&a.json(), &p.labels), &logits[3]);

    // A raw image/* body.
    let a = call_as(&app, "image/png", bytes[2].clone()).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_close(&by_label(&a.json(), &p.labels), &want[2]);

    // Concurrent requests are batched together (a short wait makes it certain).
    let s = Server::new(
        Predictor::load(&f.model).unwrap(),
        ServeConfig {
            batch_wait: Duration::from_millis(50),
            ..Default::default()
        },
    )
    .unwrap();
    let app = s.router();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let app = app.clone();
            let body = json!({ "inputs": [b64(&bytes[i % 4])] });
            tokio::spawn(async move { predict(&app, body).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_close(&by_label(&a.json()[0], &p.labels), &want[i % 4]);
    }
    let m = String::from_utf8(call(&app, "GET", "/metrics", "").await.body).unwrap();
    let (alone, batches) = hist(&m, "ferrotune_batch_requests", "1");
    assert!(alone < batches, "no batch of more than one request:\n{m}");
    assert!(m.contains("ferrotune_inputs_total 8\n"), "{m}");

    // /info says what the model reads and the image caps.
    let info = call(&app, "GET", "/info", "").await.json();
    assert_eq!(info["input"], "image");
    assert_eq!(
        info["image_size"],
        json!([TINY_IMAGE_SIDE, TINY_IMAGE_SIDE])
    );
    assert_eq!(info["tokens_per_image"], 1);
    assert_eq!(info["max_image_bytes"], 10 << 20);
    assert_eq!(info["max_image_pixels"], 16 << 20);
    assert!(info.get("max_input_length").is_none(), "{info}");
    drop(f.dir);
}

/// Bad images get a one-line JSON error of the right status and the server keeps
/// serving; a text model refuses images with a 400 and answers text as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_get_json_errors() {
    let f = image_fixture();
    let good = std::fs::read(&f.files[1]).unwrap(); // 12×12
                                                    // 64×64 = 4096 pixels, over the cap of 1000, in fewer bytes than the byte cap.
    let many_pixels = {
        let mut out = Vec::new();
        image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    // Noise: a PNG of many bytes and few pixels.
    let noise = {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let img = image::RgbImage::from_fn(30, 30, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
        });
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let max_bytes = 2000;
    assert!(noise.len() > max_bytes && many_pixels.len() < max_bytes);
    let s = Server::new(
        Predictor::load(&f.model).unwrap(),
        ServeConfig {
            max_image_bytes: max_bytes,
            max_image_pixels: 1000,
            max_inputs_per_request: 3,
            max_body_bytes: 20_000,
            ..Default::default()
        },
    )
    .unwrap();
    let app = s.router();
    let bad = StatusCode::BAD_REQUEST;
    let big = StatusCode::PAYLOAD_TOO_LARGE;

    // 400: text sent to an image model, bad base64, base64 of something not an image.
    predict(&app, json!({"inputs": "a great movie"}))
        .await
        .assert_one_line_error(bad, "`inputs` is not base64");
    predict(&app, json!({"inputs": [b64(&good), "!!!!"]}))
        .await
        .assert_one_line_error(bad, "`inputs[1]` is not base64");
    predict(&app, json!({"inputs": b64(b"plain text, base64-encoded")}))
        .await
        .assert_one_line_error(
            bad,
            "inputs: not an image (expected JPEG, PNG, BMP or WebP)",
        );
    predict(&app, json!({"inputs": "data:text/plain,hello"}))
        .await
        .assert_one_line_error(bad, "not base64");
    let cut = &good[..good.len() / 2];
    predict(&app, json!({"inputs": b64(cut)}))
        .await
        .assert_one_line_error(bad, "inputs: cannot decode the image");
    post_form(
        &app,
        &[("file", Some("notes.txt"), Some("text/plain"), b"hello")],
    )
    .await
    .assert_one_line_error(bad, "part 1 (\"notes.txt\"): not an image");
    post_form(&app, &[("raw_scores", None, None, b"true")])
        .await
        .assert_one_line_error(bad, "no file part");
    call_as(&app, "multipart/form-data", "garbage")
        .await
        .assert_one_line_error(bad, "cannot read the form");
    call_as(&app, "image/png", "hello, not an image")
        .await
        .assert_one_line_error(bad, "the body: not an image");
    // 422: JSON of the wrong shape.
    predict(&app, json!({"inputs": [[b64(&good), b64(&good)]]}))
        .await
        .assert_one_line_error(StatusCode::UNPROCESSABLE_ENTITY, "`inputs[0]` must be");
    post_form(&app, &[("caption", None, None, b"a cat")])
        .await
        .assert_one_line_error(StatusCode::UNPROCESSABLE_ENTITY, "form field `caption`");
    // 413: bytes and pixels per image, images per request, the body.
    predict(&app, json!({"inputs": b64(&noise)}))
        .await
        .assert_one_line_error(big, "over the limit of 2000 bytes per image");
    post_form(&app, &[("f", Some("n.png"), Some("image/png"), &noise)])
        .await
        .assert_one_line_error(big, "part 1 (\"n.png\") is over the limit of 2000 bytes");
    call_as(&app, "image/png", noise.clone())
        .await
        .assert_one_line_error(big, "the body is 2");
    let a = call_as(&app, "image/png", noise.clone()).await;
    assert!(a.json()["error"]
        .as_str()
        .unwrap()
        .ends_with("over the limit of 2000 bytes per image"));
    predict(&app, json!({"inputs": [b64(&good), b64(&many_pixels)]}))
        .await
        .assert_one_line_error(
            big,
            "inputs[1] is 64×64 = 4096 pixels, over the limit of 1000",
        );
    post_form(&app, &[("f", Some("big.jpg"), None, &many_pixels)])
        .await
        .assert_one_line_error(big, "4096 pixels");
    let g: &[u8] = &good;
    post_form(
        &app,
        &[
            ("a", Some("1"), None, g),
            ("a", Some("2"), None, g),
            ("a", Some("3"), None, g),
            ("a", Some("4"), None, g),
        ],
    )
    .await
    .assert_one_line_error(big, "over the limit of 3 inputs per request");
    predict(&app, json!({"inputs": [b64(g), b64(g), b64(g), b64(g)]}))
        .await
        .assert_one_line_error(big, "4 inputs is over the limit of 3");
    // A form over the body limit (a long preamble before its parts, which the parser
    // reads through).
    let mut over = vec![b'x'; 25_000];
    over.extend(b"\r\n");
    over.extend(form(&[("f", Some("ok.png"), None, g)]));
    call_as(
        &app,
        &format!("multipart/form-data; boundary={BOUNDARY}"),
        over,
    )
    .await
    .assert_one_line_error(big, "the body is over the limit of 20000 bytes");

    // Still serving, and every bad request was counted, none as a 5xx.
    let a = post_form(&app, &[("f", Some("ok.png"), Some("image/png"), g)]).await;
    assert_eq!(a.status, StatusCode::OK);
    let m = String::from_utf8(call(&app, "GET", "/metrics", "").await.body).unwrap();
    for status in [400, 413, 422] {
        let line = format!("ferrotune_requests_total{{path=\"/predict\",status=\"{status}\"}}");
        assert!(m.contains(&line), "{line} missing:\n{m}");
    }
    assert!(!m.contains("status=\"5"), "{m}");

    // A text model: images are a 400; text is answered as before.
    let t = fixture();
    let s = server(&t, ServeConfig::default());
    let app = s.router();
    post_form(&app, &[("f", Some("ok.png"), Some("image/png"), g)])
        .await
        .assert_one_line_error(bad, "this model reads text, not images");
    call_as(&app, "image/png", good.clone())
        .await
        .assert_one_line_error(bad, "this model reads text, not images");
    let a = predict(&app, json!({"inputs": text(0, 5)})).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/info", "").await.json()["input"], "text");
}

/// The image caps are validated: the pixel cap at most the decoder's.
#[test]
fn image_caps_are_validated() {
    for cfg in [
        ServeConfig {
            max_image_pixels: 0,
            ..Default::default()
        },
        ServeConfig {
            max_image_pixels: ferrotune::data::image::MAX_PIXELS + 1,
            ..Default::default()
        },
        ServeConfig {
            max_image_bytes: 0,
            ..Default::default()
        },
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("max_image_"), "{e}");
    }
}

/// A language model's server (`POST /generate`, TGI's request and answer): greedy
/// answers are the library's generation, token for token; a seeded sampled answer repeats;
/// `details` counts the tokens; bad requests are JSON 4xx errors naming the field;
/// `/info` says it generates text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_language_model_server_answers_as_the_librarys_generation() {
    use ferrotune::generate::{Sampling, TextGenerator};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("lm");
    ferrotune::testing::write_tiny_decoder(&model, "llama", 5, |_| {}).unwrap();
    let app = ferrotune::serve::generate::router(
        TextGenerator::load(&model).unwrap(),
        &ServeConfig::default(),
    );
    let lib = TextGenerator::load(&model).unwrap();
    let prompt = "the movie was";
    let greedy = Sampling {
        max_new_tokens: 6,
        ..Sampling::default()
    };
    let want = lib.run(prompt, &greedy, |_| {}).unwrap();
    let a = call(
        &app,
        "POST",
        "/generate",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": 6, "details": true}}).to_string(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json());
    let v = a.json();
    assert_eq!(v["generated_text"], want.text.as_str(), "{v}");
    assert_eq!(v["details"]["generated_tokens"], want.ids.len());
    assert_eq!(v["details"]["finish_reason"], want.finish.as_str());
    assert!(want.ids.len() <= 6 && !want.ids.is_empty());

    // Sampling with a seed: the same answer twice, and the library's.
    let sampled = json!({"inputs": prompt,
        "parameters": {"max_new_tokens": 6, "temperature": 1.5, "top_p": 0.95, "seed": 11}})
    .to_string();
    let (a1, a2) = (
        call(&app, "POST", "/generate", sampled.clone())
            .await
            .json(),
        call(&app, "POST", "/generate", sampled).await.json(),
    );
    assert_eq!(a1, a2);
    let s = Sampling {
        max_new_tokens: 6,
        temperature: 1.5,
        top_p: 0.95,
        seed: 11,
    };
    assert_eq!(
        a1["generated_text"],
        lib.run(prompt, &s, |_| {}).unwrap().text.as_str()
    );

    call(
        &app,
        "POST",
        "/generate",
        json!({"input": prompt}).to_string(),
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation", "inputs");
    call(
        &app,
        "POST",
        "/generate",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": 4000}}).to_string(),
    )
    .await
    .assert_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
        "max_new_tokens",
    );
    call(&app, "POST", "/generate", "{not json")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "validation", "JSON");
    let g = call(&app, "GET", "/generate", "").await;
    assert_eq!(g.status, StatusCode::METHOD_NOT_ALLOWED);
    let info = call(&app, "GET", "/info", "").await.json();
    assert_eq!(info["task"], "text-generation");
}
