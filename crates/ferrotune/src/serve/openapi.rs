//! The OpenAPI 3.0 description served at `GET /openapi.json` (hand-written, static).

/// The OpenAPI document (JSON).
pub const OPENAPI_JSON: &str = r##"{
  "openapi": "3.0.3",
  "info": {
    "title": "ferrotune serve",
    "description": "Text classification with a model fine-tuned by ferrotune. POST /predict takes the request shape of Hugging Face Text Embeddings Inference.",
    "license": {"name": "Apache-2.0"},
    "version": "0.1.0"
  },
  "paths": {
    "/predict": {
      "post": {
        "summary": "Classify one text, or a list of texts or text pairs",
        "operationId": "predict",
        "requestBody": {
          "required": true,
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}}
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
            "example": "Shares in the company rose 5% after its profits beat forecasts."
          },
          "raw_scores": {"type": "boolean", "default": false, "description": "Answer the head's raw outputs (logits) instead of probabilities."},
          "truncate": {"type": "boolean", "default": true, "description": "Cut inputs longer than the model's maximum length; when false such an input is a 413."},
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
          "max_input_length": {"type": "integer"},
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
