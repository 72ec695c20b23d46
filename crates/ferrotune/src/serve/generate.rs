//! Serving a language model: Text Generation Inference's `POST /generate`.
//!
//! `{"inputs": "prompt", "parameters": {"max_new_tokens": 20, "temperature": 0.7,
//! "top_p": 0.9, "seed": 1, "do_sample": true, "details": false}}` →
//! `{"generated_text": "..."}` (with `"details": true` also `details.finish_reason`,
//! `generated_tokens`, `seed`). Greedy unless `do_sample` is true or a `temperature` or
//! `top_p` below 1 is given, as TGI. Each generation runs on tokio's blocking pool; at most
//! `workers` run at once, `max_concurrent_requests` wait (429 above), and one not done in
//! `request_timeout` is a 503. `GET /health` and `GET /info` answer as for classifiers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::api::ApiError;
use super::ServeConfig;
use crate::generate::{Sampling, TextGenerator};

/// Largest `max_new_tokens` a request may ask for.
pub const MAX_NEW_TOKENS: usize = 4096;

struct Shared {
    generator: Arc<TextGenerator>,
    /// One permit per generation running.
    running: Arc<Semaphore>,
    /// One permit per request admitted (running or waiting).
    admitted: Arc<Semaphore>,
    timeout: Duration,
    info: Value,
}

/// The routes of a language-model server over `generator`.
pub fn router(generator: TextGenerator, cfg: &ServeConfig) -> Router {
    let max = generator.model.generator().map_or(0, |g| g.max_positions());
    let info = json!({
        "model": generator.dir.display().to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "task": "text-generation",
        "max_positions": max,
        "max_new_tokens": MAX_NEW_TOKENS,
        "max_concurrent_requests": cfg.max_concurrent_requests,
        "request_timeout_ms": cfg.request_timeout.as_millis() as u64,
        "workers": cfg.workers,
    });
    let s = Arc::new(Shared {
        generator: Arc::new(generator),
        running: Arc::new(Semaphore::new(cfg.workers.max(1))),
        admitted: Arc::new(Semaphore::new(cfg.max_concurrent_requests.max(1))),
        timeout: cfg.request_timeout,
        info,
    });
    let not_allowed = || async {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        )
    };
    Router::new()
        .route("/generate", post(generate).fallback(not_allowed))
        .route(
            "/health",
            get(|| async { Json(json!({"status": "ok"})) }).fallback(not_allowed),
        )
        .route(
            "/info",
            get(|State(s): State<Arc<Shared>>| async move { Json(s.info.clone()) })
                .fallback(not_allowed),
        )
        .fallback(|m: Method, u: axum::http::Uri| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {m} {}", u.path()),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(s)
}

/// The request's prompt and sampling, or a 400/422 naming the field.
pub fn parse(body: &[u8]) -> Result<(String, Sampling, bool), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let inputs = match v.get("inputs") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::unprocessable("`inputs` must be a string")),
        None => return Err(ApiError::unprocessable("missing field `inputs`")),
    };
    let empty = json!({});
    let p = match v.get("parameters") {
        None | Some(Value::Null) => &empty,
        Some(p @ Value::Object(_)) => p,
        Some(_) => return Err(ApiError::unprocessable("`parameters` must be an object")),
    };
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        match p.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                ApiError::unprocessable(format!("`parameters.{k}` must be a number"))
            }),
        }
    };
    let max_new = match num("max_new_tokens")? {
        None => 20,
        Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= MAX_NEW_TOKENS as f64 => n as usize,
        Some(n) => {
            return Err(ApiError::unprocessable(format!(
                "`parameters.max_new_tokens` must be a whole number from 1 to {MAX_NEW_TOKENS}, got {n}"
            )))
        }
    };
    let temperature = num("temperature")?;
    if temperature.is_some_and(|t| t <= 0.0 || !t.is_finite()) {
        return Err(ApiError::unprocessable(
            "`parameters.temperature` must be strictly positive",
        ));
    }
    let top_p = num("top_p")?;
    if top_p.is_some_and(|t| !(t > 0.0 && t < 1.0)) {
        return Err(ApiError::unprocessable(
            "`parameters.top_p` must be > 0.0 and < 1.0",
        ));
    }
    let seed = match num("seed")? {
        None => 0,
        Some(s) if s >= 0.0 && s.fract() == 0.0 => s as u64,
        Some(_) => {
            return Err(ApiError::unprocessable(
                "`parameters.seed` must be a whole number",
            ))
        }
    };
    let do_sample = match p.get("do_sample") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::unprocessable(
                "`parameters.do_sample` must be true or false",
            ))
        }
    };
    let details = matches!(p.get("details"), Some(Value::Bool(true)));
    let sample = do_sample || temperature.is_some_and(|t| t != 1.0) || top_p.is_some();
    let s = Sampling {
        max_new_tokens: max_new,
        temperature: if sample {
            temperature.unwrap_or(1.0)
        } else {
            0.0
        },
        top_p: top_p.unwrap_or(1.0),
        seed,
    };
    Ok((inputs, s, details))
}

async fn generate(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let (prompt, sampling, details) = parse(&body)?;
    let _admitted = s.admitted.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "too many concurrent requests",
        )
        .retry_after(1)
    })?;
    let work = async {
        let _running = s.running.clone().acquire_owned().await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy",
                "shutting down",
            )
        })?;
        let g = s.generator.clone();
        tokio::task::spawn_blocking(move || {
            let ids = g.encode(&prompt)?;
            let max = g.model.generator().map_or(0, |m| m.max_positions());
            if ids.len() + sampling.max_new_tokens > max {
                return Ok(Err(ApiError::unprocessable(format!(
                    "`inputs` tokens + `max_new_tokens` must be <= {max}. Given: {} `inputs` tokens and {} `max_new_tokens`",
                    ids.len(),
                    sampling.max_new_tokens
                ))));
            }
            g.run(&prompt, &sampling, |_| {}).map(Ok)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string()))?
    };
    let out = tokio::time::timeout(s.timeout, work).await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "request timed out",
        )
    })??;
    let mut v = json!({ "generated_text": out.text });
    if details {
        v["details"] = json!({
            "finish_reason": out.finish.as_str(),
            "generated_tokens": out.ids.len(),
            "prompt_tokens": out.prompt_tokens,
            "seed": sampling.seed,
        });
    }
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TGI's parameters: greedy by default, sampling when asked; bad values are 422s.
    #[test]
    fn parameters_parse_as_tgi() {
        let (p, s, d) = parse(br#"{"inputs": "hi"}"#).unwrap();
        assert_eq!(
            (p.as_str(), s.max_new_tokens, s.temperature, d),
            ("hi", 20, 0.0, false)
        );
        let (_, s, d) = parse(
            br#"{"inputs": "hi", "parameters": {"max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3, "details": true}}"#,
        )
        .unwrap();
        assert_eq!(
            (s.max_new_tokens, s.temperature, s.top_p, s.seed, d),
            (5, 0.5, 0.9, 3, true)
        );
        let (_, s, _) = parse(br#"{"inputs": "hi", "parameters": {"do_sample": true}}"#).unwrap();
        assert_eq!(s.temperature, 1.0);
        for bad in [
            &br#"{"input": "hi"}"#[..],
            br#"{"inputs": 3}"#,
            br#"{"inputs": "x", "parameters": {"max_new_tokens": 0}}"#,
            br#"{"inputs": "x", "parameters": {"temperature": 0}}"#,
            br#"{"inputs": "x", "parameters": {"top_p": 1.5}}"#,
            br#"{"inputs": "x", "parameters": []}"#,
        ] {
            let e = parse(bad).err().unwrap();
            assert_eq!(
                e.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b"not json").err().unwrap().status,
            StatusCode::BAD_REQUEST
        );
    }
}
