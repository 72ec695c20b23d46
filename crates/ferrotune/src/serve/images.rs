//! Images on `POST /predict`, for a model that reads them: base64 strings in the JSON
//! request (`{"inputs": "<base64>"}` or a list of them, data URLs too, as Hugging Face's
//! inference API takes them), `multipart/form-data` file parts, or a raw `image/*` body.
//!
//! Each image is checked against the per-image caps — its size in bytes, then its pixel
//! count read from its header, before anything is decoded — and decoded by
//! [`crate::data::image::decode_bytes_limited`], the decoder `ferrotune predict` uses.
//! [`decode`] blocks: the server calls it on tokio's blocking pool.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use axum::body::Bytes;
use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{alphabet, Engine};
use serde_json::Value;

use super::api::{flag, kind, request_object, ApiError};
use crate::data::batch::Features;
use crate::data::image;

/// How a `POST /predict` body is sent, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// JSON (any type that is not one of the two below, or none: the text server never
    /// checked it, and curl sends JSON as a form by default).
    Json,
    /// `multipart/form-data`: images as file parts.
    Multipart,
    /// `image/*`: the body is one image.
    Image,
}

/// The kind of body `headers` announce.
pub fn body_kind(headers: &HeaderMap) -> BodyKind {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim_start()
        .to_ascii_lowercase();
    if ct.starts_with("multipart/form-data") {
        BodyKind::Multipart
    } else if ct.starts_with("image/") {
        BodyKind::Image
    } else {
        BodyKind::Json
    }
}

/// The per-image caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest image, in bytes (as sent, after base64 decoding): 413 above.
    pub max_bytes: usize,
    /// Most pixels (width × height, from the image's header): 413 above.
    pub max_pixels: u64,
}

/// One image as received, not decoded yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// What messages call it: `inputs[0]`, `part 1 ("cat.png")`, `the body`.
    pub name: String,
    /// Its bytes, or the base64 string (a data URL or not) that holds them.
    pub data: Encoded,
}

/// An image's bytes as they came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// A JSON string: base64, optionally a `data:image/...;base64,` URL.
    Base64(String),
    /// Raw bytes (a multipart part, or an `image/*` body).
    Bytes(Bytes),
}

/// A request for an image model, read but not decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    /// The images, in order.
    pub images: Vec<Received>,
    /// One image sent on its own (a string, one file part, a raw body): the answer is one
    /// list of scores, not a list of lists.
    pub single: bool,
    /// Answer the head's raw outputs (logits) instead of probabilities.
    pub raw_scores: bool,
}

/// What to do instead, for a client that sent an image model something else.
const HOW: &str = "this model reads images: send each as a base64 string in \
                   {\"inputs\": ...} (a data URL is fine), as a multipart/form-data file part \
                   or as a raw image/* body";

impl ImageRequest {
    /// Parses a JSON body (the text request's shape and fields; `truncate` and
    /// `truncation_direction` are accepted and mean nothing for an image): 400 when it is
    /// not JSON, 422 when it is JSON of the wrong shape.
    pub fn from_json(body: &[u8]) -> Result<ImageRequest, ApiError> {
        let obj = request_object(body)?;
        let expected = "a base64-encoded image (a string)";
        let (items, single) = match obj.get("inputs") {
            None | Some(Value::Null) => {
                return Err(ApiError::unprocessable("missing field `inputs`"));
            }
            Some(Value::String(s)) => (vec![("inputs".to_string(), s)], true),
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return Err(ApiError::unprocessable("`inputs` is an empty list"));
                }
                let items = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok((format!("inputs[{i}]"), s)),
                        v => Err(ApiError::unprocessable(format!(
                            "`inputs[{i}]` must be {expected}, not {}",
                            kind(v)
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (items, false)
            }
            Some(v) => {
                return Err(ApiError::unprocessable(format!(
                    "`inputs` must be {expected} or a list of them, not {}",
                    kind(v)
                )))
            }
        };
        let mut images = Vec::with_capacity(items.len());
        for (name, s) in items {
            if s.trim().is_empty() {
                return Err(ApiError::unprocessable(format!("`{name}` is empty")));
            }
            images.push(Received {
                name,
                data: Encoded::Base64(s.clone()),
            });
        }
        flag(&obj, "truncate", true)?;
        Ok(ImageRequest {
            images,
            single,
            raw_scores: flag(&obj, "raw_scores", false)?,
        })
    }

    /// A raw `image/*` body: one image.
    pub fn from_raw(body: Bytes) -> ImageRequest {
        ImageRequest {
            images: vec![Received {
                name: "the body".into(),
                data: Encoded::Bytes(body),
            }],
            single: true,
            raw_scores: false,
        }
    }

    /// Reads a `multipart/form-data` body: every file part is an image, in order, whatever
    /// its field name; a text part named `raw_scores` (`true` or `false`) is the flag. A
    /// part over `limits.max_bytes` is a 413 as soon as it is, and so are more than
    /// `max_inputs` images; the body as a whole is bounded by the server's body limit
    /// (`max_body_bytes`, for messages).
    pub async fn from_multipart(
        req: Request,
        limits: ImageLimits,
        max_inputs: usize,
        max_body_bytes: usize,
    ) -> Result<ImageRequest, ApiError> {
        let mut form = Multipart::from_request(req, &()).await.map_err(|r| {
            ApiError::bad_request(format!("cannot read the form: {}", r.body_text()))
        })?;
        let failed = |e: MultipartError| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!(
                    "the body is over the limit of {max_body_bytes} bytes"
                ))
            } else {
                ApiError::bad_request(format!("cannot read the form: {}", e.body_text()))
            }
        };
        let mut images = Vec::new();
        let mut raw_scores = false;
        let mut part = 0;
        while let Some(mut field) = form.next_field().await.map_err(failed)? {
            part += 1;
            if is_text_field(&field) {
                let field_name = field.name().unwrap_or_default().to_string();
                let value = match read_field(&mut field, 64).await {
                    Ok(v) => v,
                    Err(FieldError::Form(e)) => return Err(failed(e)),
                    Err(FieldError::TooBig) => {
                        return Err(ApiError::unprocessable(format!(
                            "form field `{}` is too long",
                            crate::error::one_line(&field_name)
                        )))
                    }
                };
                let value = String::from_utf8_lossy(&value).trim().to_ascii_lowercase();
                match (field_name.as_str(), value.as_str()) {
                    ("raw_scores", "true") => raw_scores = true,
                    ("raw_scores", "false") => raw_scores = false,
                    ("raw_scores", v) => {
                        return Err(ApiError::unprocessable(format!(
                            "form field `raw_scores` must be true or false, not `{}`",
                            crate::error::one_line(v)
                        )))
                    }
                    (n, _) => {
                        return Err(ApiError::unprocessable(format!(
                            "form field `{}` is not a file: send images as file parts \
                             (curl -F 'file=@cat.png'); the only other field is `raw_scores`",
                            crate::error::one_line(n)
                        )))
                    }
                }
                continue;
            }
            if images.len() == max_inputs {
                return Err(ApiError::too_large(format!(
                    "more than {max_inputs} images, over the limit of {max_inputs} inputs per \
                     request"
                )));
            }
            let name = match field.file_name() {
                Some(f) => format!("part {part} ({:?})", crate::error::one_line(f)),
                None => format!("part {part}"),
            };
            let bytes = match read_field(&mut field, limits.max_bytes).await {
                Ok(b) => b,
                Err(FieldError::Form(e)) => return Err(failed(e)),
                Err(FieldError::TooBig) => {
                    return Err(too_many_bytes(&name, None, limits.max_bytes))
                }
            };
            images.push(Received {
                name,
                data: Encoded::Bytes(bytes.into()),
            });
        }
        if images.is_empty() {
            return Err(ApiError::bad_request(
                "the form holds no file part: send each image as one (curl -F 'file=@cat.png')",
            ));
        }
        Ok(ImageRequest {
            single: images.len() == 1,
            images,
            raw_scores,
        })
    }
}

/// A part with neither a file name nor a content type other than text: a form field.
fn is_text_field(field: &Field<'_>) -> bool {
    field.file_name().is_none()
        && field
            .content_type()
            .is_none_or(|t| t.to_ascii_lowercase().starts_with("text/plain"))
}

/// Why a part could not be read.
enum FieldError {
    /// It has more bytes than allowed.
    TooBig,
    /// The form is broken (or over the body limit).
    Form(MultipartError),
}

/// A part's bytes, at most `max` of them (refused as soon as it has more).
async fn read_field(field: &mut Field<'_>, max: usize) -> Result<Vec<u8>, FieldError> {
    let mut out = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(FieldError::Form)? {
        if out.len() + chunk.len() > max {
            return Err(FieldError::TooBig);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// 413 for image `name` of `len` bytes (unknown: not all read), over `max`.
fn too_many_bytes(name: &str, len: Option<usize>, max: usize) -> ApiError {
    let size = len.map_or_else(String::new, |n| format!("{n} bytes, "));
    ApiError::too_large(format!(
        "{name} is {size}over the limit of {max} bytes per image"
    ))
}

/// Base64 of the standard or URL-safe alphabet, padded or not.
fn engine(url_safe: bool) -> GeneralPurpose {
    let cfg = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    if url_safe {
        GeneralPurpose::new(&alphabet::URL_SAFE, cfg)
    } else {
        GeneralPurpose::new(&alphabet::STANDARD, cfg)
    }
}

/// The bytes of a base64 string or data URL (line breaks ignored, as base64 tools wrap):
/// 400 when it is not base64, 413 over `max_bytes`.
pub fn base64_bytes(name: &str, s: &str, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    // The scheme is case-insensitive (RFC 2397 follows RFC 3986).
    let url = s
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("data:"))
        .map(|_| &s[5..]);
    let payload = match url {
        Some(url) => {
            let (meta, data) = url.split_once(',').ok_or_else(|| {
                ApiError::bad_request(format!("`{name}` is a data URL without a comma"))
            })?;
            if !meta.to_ascii_lowercase().ends_with(";base64") {
                return Err(ApiError::bad_request(format!(
                    "`{name}` is a data URL that is not base64 (`data:{}`): {HOW}",
                    crate::error::one_line(meta)
                )));
            }
            data
        }
        None => s,
    };
    let clean: String = payload
        .chars()
        .filter(|c| !matches!(c, '\r' | '\n'))
        .collect();
    // A string that cannot hold fewer bytes than the cap is refused before decoding.
    if clean.len() / 4 * 3 > max_bytes.saturating_add(3) {
        return Err(too_many_bytes(&format!("`{name}`"), None, max_bytes));
    }
    let url_safe = clean.contains(['-', '_']);
    let bytes = engine(url_safe).decode(clean.as_bytes()).map_err(|e| {
        ApiError::bad_request(format!(
            "`{name}` is not base64 ({}): {HOW}",
            e.to_string().trim_end_matches('.')
        ))
    })?;
    if bytes.len() > max_bytes {
        return Err(too_many_bytes(
            &format!("`{name}`"),
            Some(bytes.len()),
            max_bytes,
        ));
    }
    Ok(bytes)
}

/// One image's features: 413 over a cap (bytes, then pixels from the header, before
/// decoding), 400 when it is not an image the decoder reads.
pub fn decode_one(img: &Received, limits: ImageLimits) -> Result<Features, ApiError> {
    let owned;
    let bytes: &[u8] = match &img.data {
        Encoded::Base64(s) => {
            owned = base64_bytes(&img.name, s, limits.max_bytes)?;
            &owned
        }
        Encoded::Bytes(b) => {
            if b.len() > limits.max_bytes {
                return Err(too_many_bytes(&img.name, Some(b.len()), limits.max_bytes));
            }
            b
        }
    };
    let name = Path::new(&img.name);
    let bad = |e: crate::error::Error| ApiError::bad_request(e.to_string());
    let (w, h) = image::dimensions(bytes, name).map_err(bad)?;
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_pixels {
        return Err(ApiError::too_large(format!(
            "{} is {w}×{h} = {pixels} pixels, over the limit of {} pixels per image",
            img.name, limits.max_pixels
        )));
    }
    let decoded = catch_unwind(AssertUnwindSafe(|| {
        image::decode_bytes_limited(bytes, name, limits.max_pixels)
    }))
    .map_err(|_| ApiError::bad_request(format!("{}: the image decoder failed on it", img.name)))?
    .map_err(bad)?;
    Ok(Features {
        ids: Vec::new(),
        type_ids: Vec::new(),
        image: Some(decoded),
    })
}

/// Every image's features, in order; the first image at fault is the error. Blocks (base64
/// and image decoding): call it on the blocking pool.
pub fn decode(images: &[Received], limits: ImageLimits) -> Result<Vec<Features>, ApiError> {
    images.iter().map(|img| decode_one(img, limits)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = ::image::RgbImage::from_pixel(w, h, ::image::Rgb([200, 10, 10]));
        let mut out = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut out),
            ::image::ImageFormat::Png,
        )
        .unwrap();
        out
    }

    const LIMITS: ImageLimits = ImageLimits {
        max_bytes: 10_000,
        max_pixels: 400,
    };

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn received(data: Encoded) -> Received {
        Received {
            name: "inputs[0]".into(),
            data,
        }
    }

    #[test]
    fn base64_data_urls_wrapped_and_url_safe_decode_alike() {
        let p = png(5, 4);
        let plain = b64(&p);
        let wrapped: String = plain
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n");
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&p);
        for s in [
            plain.clone(),
            format!("data:image/png;base64,{plain}"),
            format!("DATA:image/png;BASE64,{plain}"),
            wrapped,
            url_safe,
            plain.trim_end_matches('=').to_string(),
        ] {
            assert_eq!(base64_bytes("x", &s, 10_000).unwrap(), p, "{s}");
        }
        let f = decode_one(&received(Encoded::Base64(plain)), LIMITS).unwrap();
        let img = f.image.unwrap();
        assert_eq!((img.width(), img.height()), (5, 4));
        assert_eq!(img.get_pixel(0, 0).0, [200, 10, 10]);
    }

    #[test]
    fn bad_images_are_400_and_big_ones_413() {
        let status = |data: Encoded| decode_one(&received(data), LIMITS).unwrap_err();
        let e = status(Encoded::Base64("a great movie".into()));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.error.contains("not base64") && e.error.contains("reads images"));
        let e = status(Encoded::Base64(b64(b"just some text, not an image")));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.error.contains("inputs[0]: not an image"), "{}", e.error);
        let e = status(Encoded::Base64("data:text/plain,hello".into()));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.error.contains("not base64"), "{}", e.error);
        // Over the pixel cap (21×20 = 420 > 400), known from the header.
        let big = png(21, 20);
        let e = status(Encoded::Bytes(big.into()));
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.error.contains("21×20 = 420 pixels"), "{}", e.error);
        // Over the byte cap, as bytes and as base64.
        let small = ImageLimits {
            max_bytes: 10,
            ..LIMITS
        };
        let e = decode_one(&received(Encoded::Bytes(png(2, 2).into())), small).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.error.contains("limit of 10 bytes"), "{}", e.error);
        let e = decode_one(&received(Encoded::Base64(b64(&png(2, 2)))), small).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        // A truncated image is a 400, not a panic.
        let p = png(8, 8);
        let e = status(Encoded::Bytes(p[..p.len() - 10].to_vec().into()));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.error.contains("cannot decode"), "{}", e.error);
    }

    #[test]
    fn json_requests_parse() {
        let r = ImageRequest::from_json(br#"{"inputs": "aGk="}"#).unwrap();
        assert!(r.single && !r.raw_scores);
        assert_eq!(r.images[0].name, "inputs");
        let r = ImageRequest::from_json(br#"{"inputs": ["aGk=", "aGk="], "raw_scores": true}"#)
            .unwrap();
        assert!(!r.single && r.raw_scores);
        assert_eq!(r.images[1].name, "inputs[1]");
        for (body, needle) in [
            (&br#"{"inputs": [["a", "b"]]}"#[..], "`inputs[0]` must be"),
            (br#"{"inputs": 3}"#, "not a number"),
            (br#"{"inputs": []}"#, "empty list"),
            (br#"{"inputs": " "}"#, "`inputs` is empty"),
            (br#"{"image": "aGk="}"#, "unknown field `image`"),
        ] {
            let e = ImageRequest::from_json(body).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(e.error.contains(needle), "{needle}: {}", e.error);
        }
    }

    #[test]
    fn content_types_choose_the_body_kind() {
        let kind_of = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            body_kind(&h)
        };
        assert_eq!(
            kind_of("multipart/form-data; boundary=x"),
            BodyKind::Multipart
        );
        assert_eq!(kind_of("image/png"), BodyKind::Image);
        assert_eq!(kind_of("Image/JPEG"), BodyKind::Image);
        assert_eq!(kind_of("application/json"), BodyKind::Json);
        assert_eq!(kind_of("application/x-www-form-urlencoded"), BodyKind::Json);
        assert_eq!(body_kind(&HeaderMap::new()), BodyKind::Json);
    }
}
