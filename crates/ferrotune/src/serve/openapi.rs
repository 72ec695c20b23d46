//! The OpenAPI 3.0 description served at `GET /openapi.json` (hand-written, static).

/// The OpenAPI document (JSON).
pub const OPENAPI_JSON: &str = r##"{
  "openapi": "3.0.3",
  "info": {
    "title": "ferrotune serve",
    "description": "Classification with a model fine-tuned by ferrotune: texts, or images for a model that reads images (GET /info says which: `input`). POST /predict takes the request shape of Hugging Face Text Embeddings Inference; an image model takes base64 images in it (as Hugging Face's inference API), multipart/form-data file parts, or a raw image/* body.",
    "license": {"name": "Apache-2.0"},
    "version": "0.1.0"
  },
  "paths": {
    "/predict": {
      "post": {
        "summary": "Classify one text or image, or a list of texts, text pairs or images",
        "operationId": "predict",
        "requestBody": {
          "required": true,
          "description": "A text model takes JSON only. An image model takes JSON with base64 images, a multipart/form-data body or a raw image/* body; each image at most max_image_bytes bytes and max_image_pixels pixels (GET /info), JPEG, PNG, BMP or WebP.",
          "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "multipart/form-data": {
              "schema": {
                "type": "object",
                "description": "Image models: every file part is an image, in order, whatever its field name (one part: one list of scores; several: one list per part). The only other field is raw_scores.",
                "properties": {"raw_scores": {"type": "string", "enum": ["true", "false"], "default": "false"}},
                "additionalProperties": {"type": "string", "format": "binary"}
              }
            },
            "image/*": {"schema": {"type": "string", "format": "binary", "description": "Image models: the body is one image; the answer is one list of scores."}}
          }
        },
        "responses": {
          "200": {
            "description": "For a single string input, one list of scores; for a list input, one list of scores per input, in order. Each list holds every label, highest score first.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictResponse"}}}
          },
          "400": {"$ref": "#/components/responses/Error"},
          "413": {"$ref": "#/components/responses/Error"},
          "422": {"$ref": "#/components/responses/Error"},
          "429": {"$ref": "#/components/responses/Retry"},
          "500": {"$ref": "#/components/responses/Error"},
          "503": {"$ref": "#/components/responses/Retry"}
        }
      }
    },
    "/health": {
      "get": {
        "summary": "200 while an inference worker runs, 503 otherwise",
        "operationId": "health",
        "responses": {
          "200": {"description": "Healthy", "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string", "example": "ok"}}}}}},
          "503": {"$ref": "#/components/responses/Error"}
        }
      }
    },
    "/info": {
      "get": {
        "summary": "The model and the server's limits",
        "operationId": "info",
        "responses": {
          "200": {"description": "Model and limits", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Info"}}}}
        }
      }
    },
    "/metrics": {
      "get": {
        "summary": "Prometheus metrics (text format 0.0.4)",
        "operationId": "metrics",
        "responses": {
          "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
        }
      }
    },
    "/openapi.json": {
      "get": {
        "summary": "This document",
        "operationId": "openapi",
        "responses": {"200": {"description": "OpenAPI 3.0 document", "content": {"application/json": {"schema": {"type": "object"}}}}}
      }
    }
  },
  "components": {
    "schemas": {
      "PredictRequest": {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": false,
        "properties": {
          "inputs": {
            "oneOf": [
              {"type": "string"},
              {"type": "array", "minItems": 1, "items": {"oneOf": [
                {"type": "string"},
                {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string"}, "description": "[text, text_pair]"}
              ]}}
            ],
            "description": "Text models: texts, or [text, text_pair] lists. Image models: base64-encoded images (standard or URL-safe alphabet, padded or not, line breaks ignored; a data:image/...;base64, URL is fine), one string or a list of them.",
            "example": "Shares in the company rose 5% after its profits beat forecasts."
          },
          "raw_scores": {"type": "boolean", "default": false, "description": "Answer the head's raw outputs (logits) instead of probabilities."},
          "truncate": {"type": "boolean", "default": true, "description": "Cut inputs longer than the model's maximum length; when false such an input is a 413. Ignored for images."},
          "truncation_direction": {"type": "string", "enum": ["right", "Right"], "default": "right", "description": "Accepted for compatibility with TEI; only right truncation is supported."}
        }
      },
      "Score": {
        "type": "object",
        "required": ["label", "score"],
        "properties": {"label": {"type": "string", "example": "business"}, "score": {"type": "number", "format": "float", "example": 0.97}}
      },
      "PredictResponse": {
        "oneOf": [
          {"type": "array", "items": {"$ref": "#/components/schemas/Score"}},
          {"type": "array", "items": {"type": "array", "items": {"$ref": "#/components/schemas/Score"}}}
        ]
      },
      "Info": {
        "type": "object",
        "properties": {
          "model": {"type": "string"},
          "version": {"type": "string"},
          "problem_type": {"type": "string", "enum": ["single_label_classification", "multi_label_classification", "regression"]},
          "labels": {"type": "array", "items": {"type": "string"}},
          "pooling": {"type": "string"},
          "input": {"type": "string", "enum": ["text", "image"], "description": "What the model reads"},
          "max_input_length": {"type": "integer", "description": "Text models: the most tokens an input keeps"},
          "image_size": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2, "description": "Image models: [height, width] of the model's input (every image is resized to it by the training-time evaluation transforms)"},
          "tokens_per_image": {"type": "integer", "description": "Image models: what one image counts as in max_batch_tokens (its input's 16x16 patches)"},
          "max_image_bytes": {"type": "integer", "description": "Image models: largest image, in bytes after base64 decoding"},
          "max_image_pixels": {"type": "integer", "description": "Image models: most pixels (width x height) in an image"},
          "max_batch_tokens": {"type": "integer"},
          "max_batch_requests": {"type": "integer"},
          "max_inputs_per_request": {"type": "integer"},
          "max_concurrent_requests": {"type": "integer"},
          "request_timeout_ms": {"type": "integer"},
          "max_body_bytes": {"type": "integer"},
          "batch_wait_ms": {"type": "integer"},
          "workers": {"type": "integer"}
        }
      },
      "Error": {
        "type": "object",
        "required": ["error", "error_type"],
        "properties": {
          "error": {"type": "string"},
          "error_type": {"type": "string", "enum": ["validation", "tokenizer", "overloaded", "timeout", "unhealthy", "backend", "not_found", "method_not_allowed"]}
        }
      }
    },
    "responses": {
      "Error": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
      "Retry": {
        "description": "Try again later",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
      }
    }
  }
}
"##;
