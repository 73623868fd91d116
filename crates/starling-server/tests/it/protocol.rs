//! The protocol's documents against its one definition, `starling_core::wire::protocol`: the
//! OpenAPI document the server serves (`openapi.json`) and the README's error table list
//! exactly the `ErrorCode`s with their statuses, and the document's schemas have the fields
//! the protocol's types serialize.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use starling_core::wire::protocol::{
    CheckInAnswer, CheckInRequest, ErrorBody, ErrorCode, EvaluationReport, NeighbourKeys,
    RoundKind, SecureAssignment, SecureEnvelope, SecureEnvelopes, SecureKeys, SecureReceipt,
    SecureShare, SecureUnmasking, SecureWait, Survivors, UploadReceipt, MAX_DEVICE_ID,
};
use starling_core::Plan;

fn openapi() -> Value {
    serde_json::from_str(include_str!("../../openapi.json")).expect("openapi.json is JSON")
}

fn all_codes() -> BTreeMap<&'static str, u16> {
    ErrorCode::ALL
        .iter()
        .map(|c| (c.as_str(), c.status()))
        .collect()
}

/// `(method path, the operation)` for every operation of the document.
fn operations(doc: &Value) -> Vec<(String, &Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "put", "post", "delete", "patch", "head", "options"]
                .contains(&method.as_str())
            {
                ops.push((format!("{} {path}", method.to_uppercase()), op));
            }
        }
    }
    ops
}

fn code_list<'v>(v: &'v Value, what: &str) -> Vec<&'v str> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: x-error-codes is a list"))
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect()
}

#[test]
fn the_openapi_document_lists_every_error_code_with_its_status() {
    let doc = openapi();
    let codes = all_codes();
    let schema = &doc["components"]["schemas"]["ErrorCode"];
    let listed: BTreeSet<&str> = code_list(&schema["enum"], "ErrorCode.enum")
        .into_iter()
        .collect();
    assert_eq!(
        listed,
        codes.keys().copied().collect(),
        "the ErrorCode schema's enum is exactly ErrorCode::ALL"
    );
    let statuses: BTreeMap<&str, u16> = schema["x-status"]
        .as_object()
        .expect("ErrorCode has x-status")
        .iter()
        .map(|(c, s)| (c.as_str(), s.as_u64().unwrap() as u16))
        .collect();
    assert_eq!(
        statuses, codes,
        "x-status gives every code the status of ErrorCode::status"
    );
    assert_eq!(
        doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["$ref"],
        "#/components/schemas/ErrorCode"
    );

    // Codes any request can get, then each operation's own.
    let common = code_list(&doc["x-error-codes"], "the document");
    let mut used: BTreeSet<&str> = common.iter().copied().collect();
    for (name, op) in operations(&doc) {
        let own = code_list(&op["x-error-codes"], &name);
        for code in &own {
            assert!(
                codes.contains_key(code),
                "{name} lists `{code}`, which is no ErrorCode"
            );
            let status = codes[code].to_string();
            let answer = &op["responses"][&status];
            assert!(
                answer.is_object(),
                "{name} can answer `{code}` but documents no {status} response"
            );
            let target = answer["$ref"].as_str().unwrap_or_default();
            assert!(
                target.starts_with("#/components/responses/"),
                "{name}'s {status} answer is an error body ({target:?})"
            );
        }
        for status in op["responses"].as_object().unwrap().keys() {
            let status: u16 = status.parse().unwrap();
            if status >= 400 {
                assert!(
                    own.iter().any(|c| codes[c] == status),
                    "{name} documents a {status} answer that none of its codes has"
                );
            }
        }
        used.extend(own);
    }
    for code in &common {
        assert!(codes.contains_key(code), "`{code}` is no ErrorCode");
    }
    assert_eq!(
        used,
        codes.keys().copied().collect(),
        "every ErrorCode is answered somewhere in the document"
    );
}

#[test]
fn no_other_code_appears_in_the_openapi_document() {
    // Any string in the document that has the shape of a code and is spoken of as one (in a
    // list of codes, or as a key of x-status) must be an ErrorCode.
    fn walk<'v>(v: &'v Value, key: &str, found: &mut Vec<&'v str>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if key == "x-status" {
                        found.push(k);
                    }
                    walk(v, k, found);
                }
            }
            Value::Array(items) if key == "x-error-codes" || key == "enum" => {
                found.extend(items.iter().filter_map(Value::as_str));
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, key, found)),
            _ => {}
        }
    }
    let doc = openapi();
    let mut found = Vec::new();
    walk(&doc["components"]["schemas"]["ErrorCode"], "", &mut found);
    walk(&doc["x-error-codes"], "x-error-codes", &mut found);
    for (_, op) in operations(&doc) {
        walk(&op["x-error-codes"], "x-error-codes", &mut found);
    }
    for code in found {
        assert!(ErrorCode::parse(code).is_some(), "`{code}` is no ErrorCode");
    }
    // Nor in the prose: the old list of codes in the description is gone for good.
    let text = include_str!("../../openapi.json");
    for word in text
        .split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .filter(|w| w.contains('_'))
    {
        let code_like = [
            "unknown_",
            "invalid_",
            "_update",
            "_version",
            "_closed",
            "_token",
            "_large",
            "_long",
            "_timeout",
            "_finite",
            "_found",
            "_allowed",
            "_request",
            "_tensors",
            "_examples",
        ]
        .iter()
        .any(|p| word.starts_with(p) || word.ends_with(p));
        let not_a_code = [
            "base_version",
            "header_timeout",
            "body_timeout",
            "idle_timeout",
            "max_update_norm",
            "admin_token",
        ]
        .iter()
        .any(|w| word.starts_with(w));
        if code_like && !not_a_code {
            assert!(
                ErrorCode::parse(word).is_some(),
                "`{word}` in openapi.json looks like an error code but is none"
            );
        }
    }
}

/// The property names of an object schema, and its required ones.
fn fields(schema: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let props = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("an object schema: {schema}"))
        .keys()
        .cloned()
        .collect();
    let required = schema["required"]
        .as_array()
        .map(|r| r.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    (props, required)
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn the_openapi_schemas_match_the_protocol_types() {
    let doc = openapi();
    let schemas = &doc["components"]["schemas"];
    let check = |name: &str, schema: &Value, value: Value| {
        let (props, required) = fields(schema);
        let sent = keys(&value);
        assert_eq!(props, sent, "{name}: the schema's fields are the type's");
        assert!(
            required.is_subset(&sent),
            "{name}: required fields {required:?} are all sent"
        );
    };
    let assigned = serde_json::to_value(CheckInAnswer::Assigned {
        round: 1,
        kind: RoundKind::Evaluation,
        base_version: 0,
        token: "t".into(),
        deadline_secs: 1.0,
        plan: Plan::default(),
        model_url: "/m".into(),
        upload_url: "/u".into(),
        secure: Some(secure_assignment()),
    })
    .unwrap();
    let retry = serde_json::to_value(CheckInAnswer::Retry {
        retry_after_secs: 1.0,
        reason: "r".into(),
    })
    .unwrap();
    let variants = schemas["CheckInAnswer"]["oneOf"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    for (value, status) in [(assigned, "assigned"), (retry, "retry")] {
        let schema = variants
            .iter()
            .find(|v| v["properties"]["status"]["const"] == status)
            .unwrap_or_else(|| panic!("CheckInAnswer has a `{status}` variant"));
        assert_eq!(value["status"], status);
        check(&format!("CheckInAnswer::{status}"), schema, value);
    }
    check(
        "UploadReceipt",
        &schemas["UploadReceipt"],
        serde_json::to_value(UploadReceipt {
            status: "accepted".into(),
            round: 1,
            updates_in_round: 1,
        })
        .unwrap(),
    );
    let body = serde_json::to_value(ErrorBody::new(ErrorCode::Busy, "m")).unwrap();
    check("Error", &schemas["Error"], body.clone());
    check(
        "Error.error",
        &schemas["Error"]["properties"]["error"],
        body["error"].clone(),
    );
    check(
        "CheckInRequest",
        &schemas["CheckInRequest"],
        serde_json::to_value(CheckInRequest {
            device: Some("d".into()),
        })
        .unwrap(),
    );
    assert_eq!(
        schemas["CheckInRequest"]["properties"]["device"]["maxLength"],
        MAX_DEVICE_ID as u64
    );
    // A plan with requirements and a post-training evaluation (a plan without them leaves
    // those keys out).
    let requiring = Plan {
        requires: starling_core::Requirements {
            charging: true,
            ..starling_core::Requirements::default()
        },
        evaluate_after_training: true,
        ..Plan::default()
    };
    check(
        "Plan",
        &schemas["Plan"],
        serde_json::to_value(requiring).unwrap(),
    );
    assert!(serde_json::to_value(Plan::default()).unwrap()["requires"].is_null());
    assert!(serde_json::to_value(Plan::default()).unwrap()["evaluate_after_training"].is_null());
    assert_eq!(
        keys(&schemas["Plan"]["properties"]["requires"]["properties"]),
        keys(&serde_json::to_value(starling_core::Requirements::default()).unwrap())
    );
    check(
        "EvaluationReport",
        &schemas["EvaluationReport"],
        serde_json::to_value(EvaluationReport {
            base_version: 1,
            examples: 2,
            loss: 0.5,
            accuracy: Some(0.75),
        })
        .unwrap(),
    );
}

fn secure_assignment() -> SecureAssignment {
    SecureAssignment {
        index: 0,
        devices: 10,
        min_survivors: 8,
        input_bits: 16,
        graph_seed: "00".repeat(32),
        input_len: 6,
        clip: 1.0,
        loss_bound: 10.0,
        weight_cap: Some(100),
        skellam_mu: Some(12.5),
        secure_url: "/s".into(),
    }
}

/// Secure aggregation's wire types have exactly the fields their schemas name.
#[test]
fn the_openapi_schemas_match_the_secure_aggregation_types() {
    let doc = openapi();
    let schemas = &doc["components"]["schemas"];
    let check = |name: &str, value: Value| {
        let (props, required) = fields(&schemas[name]);
        let sent = keys(&value);
        assert_eq!(props, sent, "{name}: the schema's fields are the type's");
        assert!(
            required.is_subset(&sent),
            "{name}: required fields are sent"
        );
    };
    let to = |v: &dyn erased::Ser| v.value();
    let keys_value = SecureKeys {
        encryption: "00".repeat(32),
        masking: "00".repeat(32),
    };
    check("SecureAssignment", to(&secure_assignment()));
    check("SecureKeys", to(&keys_value));
    check(
        "NeighbourKeys",
        to(&NeighbourKeys {
            keys: vec![(1, keys_value.clone())],
        }),
    );
    let envelope = SecureEnvelope {
        from: 0,
        to: 1,
        ciphertext: "ab".into(),
    };
    check("SecureEnvelope", to(&envelope));
    check(
        "SecureEnvelopes",
        to(&SecureEnvelopes {
            envelopes: vec![envelope],
        }),
    );
    check("Survivors", to(&Survivors { survivors: vec![0] }));
    let share = SecureShare {
        owner: 1,
        x: 2,
        y: "00".repeat(32),
    };
    check("SecureShare", to(&share));
    check(
        "SecureUnmasking",
        to(&SecureUnmasking {
            seeds: vec![share.clone()],
            keys: vec![share],
        }),
    );
    check(
        "SecureWait",
        to(&SecureWait {
            status: "wait".into(),
            phase: "share_keys".into(),
            retry_after_secs: 0.5,
        }),
    );
    check(
        "SecureReceipt",
        to(&SecureReceipt {
            status: "accepted".into(),
            phase: "unmask".into(),
        }),
    );
}

/// Values of any serializable type, for the schema checks.
mod erased {
    pub(super) trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

#[test]
fn the_readme_error_table_lists_every_code_with_its_status() {
    let readme = include_str!("../../../../README.md");
    let section = readme
        .split("\n### Errors\n")
        .nth(1)
        .expect("README.md has a `### Errors` section");
    let section = section.split("\n#").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(
            cells.len(),
            3,
            "a row is | `code` | status | when |: {line}"
        );
        let code = cells[0].trim_matches('`');
        let status: u16 = cells[1]
            .parse()
            .unwrap_or_else(|_| panic!("{code}: status {:?}", cells[1]));
        let known = ErrorCode::parse(code)
            .unwrap_or_else(|| panic!("the README lists `{code}`, which is no ErrorCode"));
        assert_eq!(status, known.status(), "the README's status of `{code}`");
        assert_eq!(
            cells[2],
            known.description(),
            "the README's `when` of `{code}` is ErrorCode::description"
        );
        assert!(
            rows.insert(code, status).is_none(),
            "`{code}` is listed twice"
        );
    }
    assert_eq!(rows, all_codes(), "the README lists exactly ErrorCode::ALL");
}
