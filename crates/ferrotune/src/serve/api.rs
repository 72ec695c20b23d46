//! The wire format of `POST /predict` (Text Embeddings Inference's shape) and of errors.
//!
//! Requests are parsed by hand from a [`serde_json::Value`] rather than derived, so that
//! every mistake gets a message naming the field and what was expected.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// An error answered to a client: a status and TEI's JSON body
/// `{"error": "...", "error_type": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// One line for the client.
    pub error: String,
    /// A machine-readable kind: `validation` (the request is at fault: 400, 413, 422),
    /// `tokenizer` (422), `overloaded` (429), `timeout` (503), `unhealthy` (503),
    /// `backend` (500), `not_found` (404), `method_not_allowed` (405).
    pub error_type: &'static str,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error of `status` and `error_type`.
    pub fn new(status: StatusCode, error_type: &'static str, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            error_type,
            retry_after: None,
        }
    }

    /// 400: the body is not JSON, or not an image (for an image model).
    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "validation", error)
    }

    /// 422: JSON, but not a valid request.
    pub fn unprocessable(error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", error)
    }

    /// 413: the body, the number of inputs, an input's length or an image's bytes or
    /// pixels are over a limit.
    pub fn too_large(error: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "validation", error)
    }

    /// Adds a `Retry-After` header of `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "error_type": self.error_type});
        let mut res = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

/// One input: a text, or a text and its pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The text.
    pub text: String,
    /// The second text of a pair.
    pub text_pair: Option<String>,
}

/// A parsed `POST /predict` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredictRequest {
    /// The inputs, in order.
    pub inputs: Vec<Input>,
    /// `inputs` was one string: the answer is one list of scores, not a list of lists.
    pub single: bool,
    /// Answer the head's raw outputs (logits) instead of probabilities.
    pub raw_scores: bool,
    /// Truncate inputs longer than the model's maximum (otherwise they are a 413).
    pub truncate: bool,
}

const FIELDS: [&str; 4] = ["inputs", "raw_scores", "truncate", "truncation_direction"];

/// What JSON value `v` is, for messages (`a number`, `a list`).
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Boolean field `key` of `obj` (`default` when absent or null): 422 when not a boolean.
pub(crate) fn flag(obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::unprocessable(format!(
            "`{key}` must be a boolean, not {}",
            kind(v)
        ))),
    }
}

fn input(i: usize, v: &Value) -> Result<Input, ApiError> {
    let expected = "a string or a [text, text_pair] list of two strings";
    match v {
        Value::String(s) => Ok(Input {
            text: s.clone(),
            text_pair: None,
        }),
        Value::Array(pair) => match pair.as_slice() {
            [Value::String(a), Value::String(b)] => Ok(Input {
                text: a.clone(),
                text_pair: Some(b.clone()),
            }),
            _ => Err(ApiError::unprocessable(format!(
                "`inputs[{i}]` must be {expected}; it is a list of {} item(s){}",
                pair.len(),
                if pair.len() == 2 {
                    " that are not both strings"
                } else {
                    ""
                }
            ))),
        },
        v => Err(ApiError::unprocessable(format!(
            "`inputs[{i}]` must be {expected}, not {}",
            kind(v)
        ))),
    }
}

/// A request body's JSON object (text or images): 400 when it is not JSON, 422 when it is
/// not an object or has a field not in the request's shape.
pub(crate) fn request_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let obj = match v {
        Value::Object(o) => o,
        v => {
            return Err(ApiError::unprocessable(format!(
                "the body must be a JSON object with `inputs`, not {}",
                kind(&v)
            )))
        }
    };
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::unprocessable(format!(
            "unknown field `{k}`; expected one of `{}`",
            FIELDS.join("`, `")
        )));
    }
    Ok(obj)
}

impl PredictRequest {
    /// Parses a request body: 400 when it is not JSON, 422 when it is JSON of the wrong
    /// shape (unknown fields included).
    pub fn parse(body: &[u8]) -> Result<PredictRequest, ApiError> {
        let obj = request_object(body)?;
        let (inputs, single) = match obj.get("inputs") {
            None | Some(Value::Null) => {
                return Err(ApiError::unprocessable("missing field `inputs`"));
            }
            Some(Value::String(s)) => (
                vec![Input {
                    text: s.clone(),
                    text_pair: None,
                }],
                true,
            ),
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return Err(ApiError::unprocessable("`inputs` is an empty list"));
                }
                let inputs = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| input(i, v))
                    .collect::<Result<Vec<_>, _>>()?;
                (inputs, false)
            }
            Some(v) => {
                return Err(ApiError::unprocessable(format!(
                    "`inputs` must be a string, a list of strings or a list of \
                     [text, text_pair] pairs, not {}",
                    kind(v)
                )))
            }
        };
        // An empty text would be classified from its special tokens alone: a made-up
        // distribution. TEI answers 422 too.
        for (i, inp) in inputs.iter().enumerate() {
            let name = if single {
                "`inputs`".to_string()
            } else {
                format!("`inputs[{i}]`")
            };
            if inp.text.trim().is_empty() {
                return Err(ApiError::unprocessable(format!(
                    "{name} is empty or whitespace only"
                )));
            }
            if inp
                .text_pair
                .as_deref()
                .is_some_and(|t| t.trim().is_empty())
            {
                return Err(ApiError::unprocessable(format!(
                    "{name}: the text pair is empty or whitespace only"
                )));
            }
        }
        match obj.get("truncation_direction") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.eq_ignore_ascii_case("right") => {}
            Some(Value::String(s)) => {
                return Err(ApiError::unprocessable(format!(
                    "`truncation_direction` `{s}` is not supported: only `right`"
                )))
            }
            Some(v) => {
                return Err(ApiError::unprocessable(format!(
                    "`truncation_direction` must be a string, not {}",
                    kind(v)
                )))
            }
        }
        Ok(PredictRequest {
            inputs,
            single,
            raw_scores: flag(&obj, "raw_scores", false)?,
            truncate: flag(&obj, "truncate", true)?,
        })
    }
}

/// One input's answer: every label with its score, highest first.
pub fn scores_json(labels: &[String], scores: &[f32]) -> Value {
    let mut pairs: Vec<(&String, f32)> = labels.iter().zip(scores.iter().copied()).collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    Value::Array(
        pairs
            .into_iter()
            .map(|(l, s)| json!({"label": l, "score": s}))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_input_shapes() {
        let r = PredictRequest::parse(br#"{"inputs": "hi"}"#).unwrap();
        assert!(r.single && r.truncate && !r.raw_scores);
        assert_eq!(r.inputs.len(), 1);
        let r = PredictRequest::parse(br#"{"inputs": ["a", "b"], "raw_scores": true}"#).unwrap();
        assert!(!r.single && r.raw_scores);
        assert_eq!(r.inputs[1].text, "b");
        let r = PredictRequest::parse(br#"{"inputs": [["a", "b"]], "truncate": false}"#).unwrap();
        assert_eq!(r.inputs[0].text_pair.as_deref(), Some("b"));
        assert!(!r.truncate);
    }

    #[test]
    fn names_what_is_wrong() {
        let e = PredictRequest::parse(b"{").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        for (body, needle) in [
            (&br#"{"inputs": 3}"#[..], "not a number"),
            (br#"{"input": "x"}"#, "unknown field `input`"),
            (br#"{"inputs": []}"#, "empty"),
            (br#"{"inputs": ""}"#, "`inputs` is empty"),
            (br#"{"inputs": " \n\t"}"#, "whitespace only"),
            (br#"{"inputs": ["a", "  "]}"#, "`inputs[1]` is empty"),
            (br#"{"inputs": [["a", ""]]}"#, "text pair is empty"),
            (br#"{"inputs": [["a"]]}"#, "inputs[0]"),
            (br#"{"inputs": ["a", 1]}"#, "inputs[1]"),
            (
                br#"{"inputs": "a", "truncate": "yes"}"#,
                "`truncate` must be a boolean",
            ),
            (br#"[1]"#, "JSON object"),
            (
                br#"{"inputs": "a", "truncation_direction": "left"}"#,
                "only `right`",
            ),
        ] {
            let e = PredictRequest::parse(body).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(e.error.contains(needle), "{needle}: {}", e.error);
        }
    }

    #[test]
    fn scores_are_sorted() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let v = scores_json(&labels, &[0.25, 0.75]);
        assert_eq!(v[0]["label"], "b");
        assert_eq!(v[1]["score"], 0.25);
    }
}
