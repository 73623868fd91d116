//! The admin API over HTTP: tasks created, paused, resumed, changed and deleted at run time; a
//! model of the operator's own installed; every bad call refused with its code and the
//! server's state unchanged; admin tasks served again after a restart.

use reqwest::StatusCode;
use serde_json::Value;
use starling_core::wire::protocol::ADMIN_TOKEN_HEADER;
use starling_core::{Parameters, Tensor};
use starling_server::settings::Secret;

use crate::harness::{delta, policy, small_task, Harness};

const ADMIN: &str = "admin-token-0123456789";

const DIGITS: &str = r#"
name = "digits"
model = "logistic"
inputs = 4
outputs = 3
admission = "open"
min_cohort = 1
max_assignments_per_address = 100
[rounds]
goal = 2
min = 1
"#;

async fn server_in(dir: &std::path::Path) -> Harness {
    let mut settings = starling_server::Settings::default();
    settings.server.data_dir = dir.to_path_buf();
    settings.server.admin_token = Some(Secret::new(ADMIN));
    settings.tasks = vec![small_task(policy(3, 1, 3600.0))];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Harness::from_running(starling_server::spawn(settings, listener).await.unwrap())
}

/// An admin call: method, path, body; the status and the answer.
async fn call(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let mut req = h
        .http
        .request(method, h.url(path))
        .header(ADMIN_TOKEN_HEADER, ADMIN);
    if let Some(b) = body {
        req = req.body(b);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// The `digits` model's parameters, all `value`.
fn digits_model(value: f32) -> Parameters {
    Parameters::new(vec![
        (
            "W".into(),
            Tensor::new(vec![4, 3], vec![value; 12]).unwrap(),
        ),
        ("b".into(), Tensor::new(vec![3], vec![value; 3]).unwrap()),
    ])
    .unwrap()
}

#[tokio::test]
async fn an_operator_creates_pauses_installs_resumes_changes_and_deletes_a_task() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let h = server_in(dir.path()).await;

    // Created paused: check-ins are told to come back.
    let (status, t) = call(
        &h,
        Method::POST,
        "/v1/admin/tasks?paused=true",
        Some(DIGITS.into()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{t}");
    assert_eq!(
        (t["name"].as_str(), t["status"].as_str()),
        (Some("digits"), Some("paused"))
    );
    let v: Value = h
        .post("/v1/tasks/digits/checkin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "retry", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("paused"), "{v}");

    // The operator's model becomes version 1, exactly.
    let model = digits_model(0.25);
    let (status, v) = call(
        &h,
        Method::PUT,
        "/v1/admin/tasks/digits/model",
        Some(model.to_safetensors(None)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1);
    let served = h.get("/v1/tasks/digits/model").send().await.unwrap();
    let (params, _) = Parameters::from_safetensors(&served.bytes().await.unwrap()).unwrap();
    assert_eq!(params, model);

    // Models that do not fit, or are not finite, change nothing.
    let (status, v) = call(
        &h,
        Method::PUT,
        "/v1/admin/tasks/digits/model",
        Some(delta(1.0, 1.0).to_safetensors(None)),
    )
    .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_model")
    );
    let (status, v) = call(
        &h,
        Method::PUT,
        "/v1/admin/tasks/digits/model",
        Some(digits_model(f32::NAN).to_safetensors(None)),
    )
    .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_model")
    );
    assert_eq!(h.get_json("/v1/tasks/digits").await["version"], 1);

    // Resumed: devices get work on version 1.
    let (status, t) = call(&h, Method::POST, "/v1/admin/tasks/digits/resume", None).await;
    assert_eq!(
        (status, t["status"].as_str()),
        (StatusCode::OK, Some("training"))
    );
    let v: Value = h
        .post("/v1/tasks/digits/checkin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["status"].as_str(), v["base_version"].as_u64()),
        (Some("assigned"), Some(1))
    );

    // New settings: the round policy changes, the model and version stay.
    let changed = DIGITS.replace("goal = 2", "goal = 5");
    let (status, t) = call(
        &h,
        Method::PUT,
        "/v1/admin/tasks/digits",
        Some(changed.into()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(
        (t["round"]["goal"].as_u64(), t["version"].as_u64()),
        (Some(5), Some(1))
    );
    // The model cannot change under the same name, and a name cannot change.
    let other_model = DIGITS.replace("outputs = 3", "outputs = 4");
    let (status, v) = call(
        &h,
        Method::PUT,
        "/v1/admin/tasks/digits",
        Some(other_model.into()),
    )
    .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_settings")
    );
    let (status, v) = call(
        &h,
        Method::PUT,
        "/v1/admin/tasks/other",
        Some(DIGITS.into()),
    )
    .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_settings")
    );
    assert_eq!(h.get_json("/v1/tasks/digits").await["round"]["goal"], 5);

    // Restarted: the admin's task is served again, with its settings and version.
    h.server.stop().await.unwrap();
    let h = server_in(dir.path()).await;
    let t = h.get_json("/v1/tasks/digits").await;
    assert_eq!(
        (t["round"]["goal"].as_u64(), t["version"].as_u64()),
        (Some(5), Some(1))
    );

    // Deleted: gone, and gone after a restart too; the settings file's task cannot be.
    let (status, _) = call(&h, Method::DELETE, "/v1/admin/tasks/digits", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h.get("/v1/tasks/digits").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let (status, v) = call(&h, Method::DELETE, "/v1/admin/tasks/linear", None).await;
    assert_eq!((status, code(&v)), (StatusCode::CONFLICT, "conflict"));
    h.server.stop().await.unwrap();
    let h = server_in(dir.path()).await;
    let tasks = h.get_json("/v1/tasks").await;
    assert_eq!(tasks.as_array().unwrap().len(), 1, "{tasks}");
    // The name is free again, with fresh state.
    let (status, t) = call(&h, Method::POST, "/v1/admin/tasks", Some(DIGITS.into())).await;
    assert_eq!(
        (status, t["version"].as_u64()),
        (StatusCode::CREATED, Some(0))
    );
}

#[tokio::test]
async fn bad_admin_calls_are_refused_with_their_code_and_change_nothing() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let h = server_in(dir.path()).await;
    for (settings, expect) in [
        ("name = \"x\"\nmodel = \"linear\"\n", "admission"),
        ("name = \"x\"\nadmission = \"open\"\nepochs = 3\n", "epochs"),
        (
            "name = \"x\"\nadmission = \"open\"\nspec_file = \"/etc/passwd\"\n",
            "spec_file",
        ),
        (
            "name = \"x\"\nadmission = \"enrolled\"\n",
            "enrollment_secret",
        ),
        ("name = \"../x\"\nadmission = \"open\"\n", "task name"),
        ("this is not toml", "TOML"),
    ] {
        let (status, v) = call(&h, Method::POST, "/v1/admin/tasks", Some(settings.into())).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_settings"),
            "{settings}"
        );
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.to_lowercase().contains(&expect.to_lowercase()),
            "{settings}: {message}"
        );
    }
    // A name in use.
    let taken = "name = \"linear\"\nadmission = \"open\"\n";
    let (status, v) = call(&h, Method::POST, "/v1/admin/tasks", Some(taken.into())).await;
    assert_eq!((status, code(&v)), (StatusCode::CONFLICT, "conflict"));
    // The settings file's task is changed in the file, not here.
    let (status, v) = call(
        &h,
        Method::PUT,
        "/v1/admin/tasks/linear",
        Some(taken.into()),
    )
    .await;
    assert_eq!((status, code(&v)), (StatusCode::CONFLICT, "conflict"));
    // Without the token, nothing is even read.
    let r = h.post("/v1/admin/tasks").body(DIGITS).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let tasks = h.get_json("/v1/tasks").await;
    assert_eq!(tasks.as_array().unwrap().len(), 1, "{tasks}");
}

/// Settings of a task of the operator's own model (`model = "external"`).
const BYOM: &str = r#"
name = "byom"
model = "external"
admission = "open"
min_cohort = 1
max_assignments_per_address = 100
[rounds]
goal = 1
min = 1
"#;

/// A model no built-in spec describes: two tensors of the operator's choosing.
fn own_model(value: f32) -> Parameters {
    // In the order a safetensors file lists them: by name.
    Parameters::new(vec![
        (
            "encoder.bias".into(),
            Tensor::new(vec![2], vec![value; 2]).unwrap(),
        ),
        (
            "encoder.weight".into(),
            Tensor::new(vec![2, 3], vec![value; 6]).unwrap(),
        ),
    ])
    .unwrap()
}

/// The JSON body that creates a task with its initial model.
fn with_model(settings: &str, model: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    serde_json::to_vec(&serde_json::json!({
        "settings": settings,
        "initial_model": base64::engine::general_purpose::STANDARD.encode(model),
    }))
    .unwrap()
}

/// An admin call with a JSON body.
async fn call_json(h: &Harness, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let r = h
        .post(path)
        .header(ADMIN_TOKEN_HEADER, ADMIN)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

async fn byom_model(h: &Harness) -> Parameters {
    let r = h.get("/v1/tasks/byom/model").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    Parameters::from_safetensors(&r.bytes().await.unwrap())
        .unwrap()
        .0
}

#[tokio::test]
async fn an_operator_creates_a_task_of_their_own_model_through_the_admin_api() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let h = server_in(dir.path()).await;
    let model = own_model(0.5);
    let file = model.to_safetensors(None);

    // Bad calls first: each refused with its code, and no task made.
    let mut nan = own_model(0.5);
    nan.get_mut("encoder.bias").unwrap().data_mut()[1] = f32::NAN;
    for (body, expect) in [
        // TOML alone cannot define an external model.
        (None, "initial model"),
        (Some(with_model(DIGITS, &file)), "external"),
        (Some(with_model(BYOM, b"not safetensors")), "initial model"),
        (Some(with_model(BYOM, &nan.to_safetensors(None))), "nan"),
        (
            Some(with_model(
                &BYOM.replace("[rounds]", "initial_model = \"/etc/passwd\"\n[rounds]"),
                &file,
            )),
            "initial_model",
        ),
        (Some(b"{\"settings\": 3}".to_vec()), "settings"),
        (
            Some(
                serde_json::to_vec(&serde_json::json!({"settings": BYOM, "initial_model": "***"}))
                    .unwrap(),
            ),
            "base64",
        ),
    ] {
        let (status, v) = match body {
            None => call(&h, Method::POST, "/v1/admin/tasks", Some(BYOM.into())).await,
            Some(b) => call_json(&h, "/v1/admin/tasks", b).await,
        };
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_settings"),
            "{v}"
        );
        let message = v["error"]["message"].as_str().unwrap().to_lowercase();
        assert!(message.contains(expect), "{expect}: {message}");
    }
    assert_eq!(h.get_json("/v1/tasks").await.as_array().unwrap().len(), 1);

    // Created with its model: the tensors define the task, and version 0 is the model.
    let (status, t) = call_json(&h, "/v1/admin/tasks", with_model(BYOM, &file)).await;
    assert_eq!(status, StatusCode::CREATED, "{t}");
    assert_eq!(byom_model(&h).await, model);
    let spec = &h.get_json("/v1/tasks/byom").await["spec"];
    assert_eq!(spec["name"], "external", "{spec}");

    // A device of its own framework trains it: its delta makes version 1.
    let v: Value = h
        .post("/v1/tasks/byom/checkin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let answer: starling_core::wire::protocol::CheckInAnswer = serde_json::from_value(v).unwrap();
    let a = crate::harness::Assigned::try_from(answer).unwrap();
    let step = own_model(0.25);
    let (status, v) = h
        .post_update(&a.upload_url, &a.token, a.body(&step, 10))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    // The commit follows the upload's answer: wait for it (bounded).
    let mut version = 0;
    for _ in 0..400 {
        version = h.get_json("/v1/tasks/byom").await["version"]
            .as_u64()
            .unwrap();
        if version == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(version, 1, "the round never committed");
    let trained = byom_model(&h).await;
    assert_eq!(trained, own_model(0.75));

    // New settings keep the model it was created with.
    let changed = BYOM.replace("goal = 1", "goal = 3");
    let (status, t) = call(
        &h,
        Method::PUT,
        "/v1/admin/tasks/byom",
        Some(changed.into()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(
        (t["round"]["goal"].as_u64(), t["version"].as_u64()),
        (Some(3), Some(1))
    );

    // Restarted: served again, with its layout and its trained version.
    h.server.stop().await.unwrap();
    let h = server_in(dir.path()).await;
    let t = h.get_json("/v1/tasks/byom").await;
    assert_eq!(
        (t["round"]["goal"].as_u64(), t["version"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(byom_model(&h).await, own_model(0.75));
}
