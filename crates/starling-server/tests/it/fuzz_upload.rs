//! Property-based fuzzing (proptest) of the HTTP upload path, against one real server on
//! 127.0.0.1:0 with a real SQLite file: random upload requests — round path segments (`1`,
//! `+1`, `01`, `%31`, huge numbers, URIs around the 8 KiB limit, random text), the token header
//! absent, right, forged or not even text, and bodies that are valid, mutated (flipped,
//! truncated, extended, NaN or infinity spliced in), random, empty or too large.
//!
//! Every answer must be a 202 `{"status": "accepted", ...}` receipt or a JSON
//! `{"error": {"code", "message"}}` whose code is an [`ErrorCode`] answered with that code's
//! status; the round's update count must grow by exactly the number of 202s. Each request's
//! outcome is also predicted from the documented order of checks (`api.rs`: URI length, round
//! number, token header, declared length, admission, then the body through
//! [`update::check`] and the engine) and must be exactly that code, or a 202 exactly when the
//! request is valid.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use serde_json::Value;
use starling_core::wire::protocol::{
    parse_canonical_u64, CheckInAnswer, ErrorBody, ErrorCode, UploadReceipt, TOKEN_HEADER,
};
use starling_core::wire::update::{self, Rules, UpdateMeta, Weighting};
use starling_server::engine::EngineError;
use starling_server::settings::{RoundPolicy, TaskSettings};

use crate::harness::{self, delta, policy, small_task, Assigned, Harness};

/// The task's norm bound: low, so that random values cross it.
const MAX_UPDATE_NORM: f64 = 10.0;
/// The task's weight cap.
const MAX_EXAMPLES_PER_UPDATE: u64 = 10_000;
/// The longest URI the server answers (`api::MAX_URI_BYTES`).
const MAX_URI_BYTES: usize = 8 * 1024;
/// The path around an upload's round number.
const PREFIX: &str = "/v1/tasks/linear/rounds/";
const SUFFIX: &str = "/updates";

/// A server, and what the fuzzer knows of its task.
struct Fuzzer {
    h: Harness,
    /// The task's layout, its rules as the engine applies them, and its upload size limit.
    rules: Rules,
    limit: usize,
    /// How many answers of each status and code the test saw.
    answers: RefCell<BTreeMap<String, u64>>,
}

/// One `linear` task whose round never closes during the test: a goal far above the number
/// of uploads, an hour's deadline, every assignment for 127.0.0.1.
async fn start() -> Fuzzer {
    let task = TaskSettings {
        max_update_norm: MAX_UPDATE_NORM,
        max_examples_per_update: MAX_EXAMPLES_PER_UPDATE,
        max_assignments_per_address: 1_000_000,
        ..small_task(RoundPolicy {
            overcommit: 1.0,
            ..policy(10_000, 1, 3600.0)
        })
    };
    let h = harness::start(task, |_| {}).await;
    let task = &h.server.tasks[0];
    let rules = Rules {
        layout: task.spec().layout(),
        max_norm: Some(MAX_UPDATE_NORM),
        weighting: Weighting::Examples {
            cap: MAX_EXAMPLES_PER_UPDATE,
        },
        clip: None,
    };
    let limit = task.max_upload_bytes();
    Fuzzer {
        h,
        rules,
        limit,
        answers: RefCell::default(),
    }
}

fn fail(message: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(message.into())
}

// ---------------------------------------------------------------------------------------------
// Requests.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Round {
    /// The assignment's round, as the protocol writes it.
    Assigned,
    /// Any text in its place.
    Text(String),
    /// A run of this many digits: a URI just under or over the limit.
    Huge(usize),
}

#[derive(Debug, Clone)]
enum Token {
    Absent,
    Assigned,
    /// Header bytes other than the token (visible ASCII, or not text at all).
    Forged(Vec<u8>),
}

#[derive(Debug, Clone)]
enum BodyToken {
    Assigned,
    Forged(String),
}

/// An update as a device would encode it, wrong at times.
#[derive(Debug, Clone)]
struct Update {
    w: f32,
    b: f32,
    /// Added to the assignment's base version (0 mostly; more is stale).
    base_offset: u64,
    examples: u64,
    loss: Option<f32>,
    accuracy: Option<f32>,
    token: BodyToken,
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Extend(Vec<u8>),
    /// A NaN or an infinity over one of the values.
    NonFinite(Index, u32),
}

#[derive(Debug, Clone)]
enum Body {
    Valid(Update),
    Mutated(Update, Mutation),
    Random(Vec<u8>),
    Empty,
    /// This many bytes over the task's upload limit.
    Oversized(usize),
}

#[derive(Debug, Clone)]
struct Request {
    round: Round,
    token: Token,
    body: Body,
}

fn round() -> impl Strategy<Value = Round> {
    let fixed = select(vec![
        "1",
        "+1",
        "01",
        "%31",
        "0",
        "2",
        "-1",
        "1.0",
        "1 ",
        " 1",
        "1%20",
        "0x1",
        "1e0",
        "١",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999999999",
        "abc",
        "",
        "1/2",
        "%",
        "%zz",
        "%2e",
        ".",
        "..",
        "1?x=1",
        "1#x",
        "1;x",
    ]);
    prop_oneof![
        12 => Just(Round::Assigned),
        3 => fixed.prop_map(|t| Round::Text(t.into())),
        1 => "[0-9A-Za-z%+.~_-]{0,12}".prop_map(Round::Text),
        1 => (MAX_URI_BYTES - 64..MAX_URI_BYTES + 64).prop_map(Round::Huge),
    ]
}

fn token() -> impl Strategy<Value = Token> {
    let visible = "[!-~]{1,43}".prop_map(String::into_bytes);
    let bytes = prop::collection::vec(prop_oneof![0x21u8..=0x7e, 0x80u8..=0xff], 1..24);
    prop_oneof![
        1 => Just(Token::Absent),
        12 => Just(Token::Assigned),
        1 => visible.prop_map(Token::Forged),
        1 => bytes.prop_map(Token::Forged),
        1 => Just(Token::Forged(Vec::new())),
    ]
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -5.0f32..5.0,
        2 => -1e6f32..1e6,
        1 => select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 0.0]),
    ]
}

fn update_spec() -> impl Strategy<Value = Update> {
    let examples = prop_oneof![
        8 => 1u64..=20_000,
        1 => select(vec![0u64, 1_000_000_000, 1_000_000_001, u64::MAX]),
    ];
    let body_token = prop_oneof![
        8 => Just(BodyToken::Assigned),
        1 => ".{0,20}".prop_map(BodyToken::Forged),
    ];
    (
        value(),
        value(),
        prop_oneof![9 => Just(0u64), 1 => 1u64..5],
        examples,
        proptest::option::of(prop_oneof![0.0f32..10.0, Just(-1.0f32)]),
        proptest::option::of(0.0f32..1.2),
        body_token,
    )
        .prop_map(
            |(w, b, base_offset, examples, loss, accuracy, token)| Update {
                w,
                b,
                base_offset,
                examples,
                loss,
                accuracy,
                token,
            },
        )
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let non_finite = select(vec![0x7fc0_0000u32, 0xffc0_0000, 0x7f80_0000, 0xff80_0000]);
    prop_oneof![
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
        1 => (any::<Index>(), non_finite).prop_map(|(i, b)| Mutation::NonFinite(i, b)),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        8 => update_spec().prop_map(Body::Valid),
        5 => (update_spec(), mutation()).prop_map(|(u, m)| Body::Mutated(u, m)),
        1 => prop::collection::vec(any::<u8>(), 1..300).prop_map(Body::Random),
        1 => Just(Body::Empty),
        1 => (1usize..4096).prop_map(Body::Oversized),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (round(), token(), body()).prop_map(|(round, token, body)| Request { round, token, body })
}

fn encode(u: &Update, a: &Assigned) -> Vec<u8> {
    update::encode(
        &delta(u.w, u.b),
        &UpdateMeta {
            base_version: a.base_version.wrapping_add(u.base_offset),
            examples: u.examples,
            loss: u.loss,
            accuracy: u.accuracy,
            token: match &u.token {
                BodyToken::Assigned => a.token.clone(),
                BodyToken::Forged(t) => t.clone(),
            },
        },
    )
}

impl Request {
    fn round_text(&self, a: &Assigned) -> String {
        match &self.round {
            Round::Assigned => a.round.to_string(),
            Round::Text(t) => t.clone(),
            Round::Huge(n) => "9".repeat(*n),
        }
    }

    fn header(&self, a: &Assigned) -> Option<Vec<u8>> {
        match &self.token {
            Token::Absent => None,
            Token::Assigned => Some(a.token.clone().into_bytes()),
            Token::Forged(b) => Some(b.clone()),
        }
    }

    fn body(&self, a: &Assigned, limit: usize) -> Vec<u8> {
        match &self.body {
            Body::Valid(u) => encode(u, a),
            Body::Mutated(u, m) => {
                let mut body = encode(u, a);
                match m {
                    Mutation::Flip(i, mask) => {
                        let at = i.index(body.len());
                        body[at] ^= mask;
                    }
                    Mutation::Truncate(i) => body.truncate(i.index(body.len())),
                    Mutation::Extend(extra) => body.extend_from_slice(extra),
                    Mutation::NonFinite(i, bits) => {
                        // The data is the last 8 bytes: two f32 values.
                        let at = body.len() - 8 + 4 * i.index(2);
                        body[at..at + 4].copy_from_slice(&bits.to_le_bytes());
                    }
                }
                body
            }
            Body::Random(bytes) => bytes.clone(),
            Body::Empty => Vec::new(),
            Body::Oversized(over) => vec![b'x'; limit + over],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The expected answer, from the documented order of checks.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Accepted,
    Refused(ErrorCode),
    /// Some refusal (the path does not reach the upload route as sent).
    AnyRefusal,
}

impl Fuzzer {
    /// The answer to this request by the order of checks `api.rs` documents: the URI's length,
    /// the route, the round number's form, the token header, the declared length, admission
    /// (the open round, an undelivered assignment), then the body through `update::check` with
    /// the task's rules, its token against the header's, its base version.
    fn expect(
        &self,
        url: &reqwest::Url,
        header: Option<&[u8]>,
        body: &[u8],
        a: &Assigned,
    ) -> Expect {
        let uri_len = url.path().len() + url.query().map_or(0, |q| q.len() + 1);
        if uri_len > MAX_URI_BYTES {
            return Expect::Refused(ErrorCode::UriTooLong);
        }
        // The round segment as the server sees it, if the path is the upload route.
        let segments: Vec<&str> = url.path().split('/').collect();
        let routed = url.query().is_none()
            && segments.len() == 7
            && segments[..5] == ["", "v1", "tasks", "linear", "rounds"]
            && segments[6] == "updates"
            && !segments[5].is_empty();
        if !routed {
            return Expect::AnyRefusal;
        }
        let Some(round) = parse_canonical_u64(segments[5]) else {
            return Expect::Refused(ErrorCode::UnknownRound);
        };
        let Some(header) = header else {
            return Expect::Refused(ErrorCode::MissingToken);
        };
        if HeaderValue::from_bytes(header).unwrap().to_str().is_err() {
            return Expect::Refused(ErrorCode::InvalidToken);
        }
        if body.len() > self.limit {
            return Expect::Refused(ErrorCode::PayloadTooLarge);
        }
        if body.is_empty() {
            return Expect::Refused(ErrorCode::MalformedUpdate);
        }
        // Admission: the open round, and an assignment of it that has not delivered.
        if round != a.round {
            return Expect::Refused(if round >= 1 && round < a.round {
                ErrorCode::RoundClosed
            } else {
                ErrorCode::UnknownRound
            });
        }
        if header != a.token.as_bytes() {
            return Expect::Refused(ErrorCode::InvalidToken);
        }
        // The body, as the engine checks it.
        match update::check(body.to_vec(), &self.rules) {
            Err(e) => Expect::Refused(EngineError::Update(e).code()),
            Ok(c) if c.meta().token != a.token => Expect::Refused(ErrorCode::InvalidToken),
            Ok(c) if c.meta().base_version != a.base_version => {
                Expect::Refused(ErrorCode::StaleVersion)
            }
            Ok(_) => Expect::Accepted,
        }
    }

    async fn check_in(&self) -> Result<Assigned, TestCaseError> {
        let r = self
            .h
            .post("/v1/tasks/linear/checkin")
            .send()
            .await
            .map_err(|e| fail(format!("check-in: {e}")))?;
        prop_assert_eq!(r.status().as_u16(), 200);
        let answer = r
            .json::<CheckInAnswer>()
            .await
            .map_err(|e| fail(format!("check-in answer: {e}")))?;
        Assigned::try_from(answer)
            .map_err(|other| fail(format!("expected an assignment, got {other:?}")))
    }

    /// The open round's number and update count.
    async fn round(&self) -> Result<(u64, u64), TestCaseError> {
        let v: Value = self
            .h
            .get("/v1/tasks/linear")
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| fail(format!("task status: {e}")))?
            .json()
            .await
            .map_err(|e| fail(format!("task status: {e}")))?;
        let number = |v: &Value| v.as_u64().ok_or_else(|| fail(format!("task status: {v}")));
        Ok((
            number(&v["round"]["round"])?,
            number(&v["round"]["updates"])?,
        ))
    }

    /// Sends one request; checks its answer's form, its predicted outcome and the count.
    async fn case(&self, req: Request, accepted: &Cell<u64>) -> Result<(), TestCaseError> {
        let a = self.check_in().await?;
        let (round_before, updates_before) = self.round().await?;
        prop_assert_eq!(round_before, a.round);

        let url = self
            .h
            .url(&format!("{PREFIX}{}{SUFFIX}", req.round_text(&a)));
        let url = reqwest::Url::parse(&url).map_err(|e| fail(format!("{url:?}: {e}")))?;
        let header = req.header(&a);
        let body = req.body(&a, self.limit);
        let expect = self.expect(&url, header.as_deref(), &body, &a);

        let mut request = self.h.http.post(url.clone()).body(body);
        if let Some(h) = &header {
            request = request.header(TOKEN_HEADER, HeaderValue::from_bytes(h).unwrap());
        }
        let r = request
            .send()
            .await
            .map_err(|e| fail(format!("{url}: no answer: {e:?}")))?;
        let status = r.status().as_u16();
        let json = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let text = r
            .bytes()
            .await
            .map_err(|e| fail(format!("{url}: {status} without a whole body: {e}")))?;
        let shown = String::from_utf8_lossy(&text).into_owned();
        let code: Option<String> = serde_json::from_slice::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(String::from));
        *self
            .answers
            .borrow_mut()
            .entry(format!(
                "{status} {}",
                code.as_deref().unwrap_or("accepted")
            ))
            .or_default() += 1;
        prop_assert!(
            json,
            "{} answered {} without a JSON content type: {:?}",
            url,
            status,
            shown
        );

        let (_, updates_after) = self.round().await?;
        if status == 202 {
            accepted.set(accepted.get() + 1);
            let receipt: UploadReceipt = serde_json::from_slice(&text)
                .map_err(|e| fail(format!("{url}: a 202 that is not a receipt ({e}): {shown}")))?;
            prop_assert_eq!(&receipt.status, "accepted");
            prop_assert_eq!(receipt.round, a.round);
            prop_assert_eq!(receipt.updates_in_round, updates_after);
            prop_assert_eq!(
                updates_after,
                updates_before + 1,
                "a 202 did not count once"
            );
            prop_assert_eq!(expect, Expect::Accepted, "{} was accepted", url);
        } else {
            let v: Value = serde_json::from_slice(&text).map_err(|e| {
                fail(format!(
                    "{url}: {status} with a body that is not JSON ({e}): {shown}"
                ))
            })?;
            prop_assert!(
                v.as_object().is_some_and(|o| o.len() == 1)
                    && v["error"].as_object().is_some_and(|o| o.len() == 2),
                "{} answered {} with {}",
                url,
                status,
                shown
            );
            let error: ErrorBody = serde_json::from_value(v)
                .map_err(|e| fail(format!("{url}: {status} not an error body ({e}): {shown}")))?;
            let code = error
                .code()
                .ok_or_else(|| fail(format!("{url}: unknown error code: {shown}")))?;
            prop_assert_eq!(
                status,
                code.status(),
                "{} answered {} with {}",
                url,
                status,
                shown
            );
            prop_assert!(!error.error.message.is_empty(), "{}: an empty message", url);
            prop_assert_eq!(
                updates_after,
                updates_before,
                "a refusal ({}) changed the round",
                code
            );
            match expect {
                Expect::Accepted => {
                    return Err(fail(format!("{url}: a valid upload was refused: {shown}")))
                }
                Expect::Refused(c) => prop_assert_eq!(code, c, "{}: {}", url, shown),
                Expect::AnyRefusal => {}
            }
        }
        Ok(())
    }
}

/// Random upload requests against one server: every answer is a receipt or a coded JSON
/// error with its code's status, exactly the predicted one, and only receipts count.
#[test]
fn random_uploads_get_coded_json_answers_and_only_receipts_count() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fuzz = runtime.block_on(start());
    let (_, initial) = runtime.block_on(fuzz.round()).unwrap();
    let accepted = Cell::new(0u64);
    // The cases the issue names, every time: a valid upload, and the same with a round number
    // that is not canonical.
    let valid = Update {
        w: 0.5,
        b: -0.25,
        base_offset: 0,
        examples: 10,
        loss: Some(0.5),
        accuracy: None,
        token: BodyToken::Assigned,
    };
    for round in [
        Round::Assigned,
        Round::Text("+1".into()),
        Round::Text("01".into()),
        Round::Text("%31".into()),
    ] {
        let req = Request {
            round,
            token: Token::Assigned,
            body: Body::Valid(valid.clone()),
        };
        if let Err(e) = runtime.block_on(fuzz.case(req.clone(), &accepted)) {
            panic!("{req:?}: {e}");
        }
    }
    assert_eq!(accepted.get(), 1);
    let mut runner = TestRunner::new(Config {
        // `PROPTEST_CASES` runs a longer fuzz.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64),
        max_shrink_iters: 256,
        // Integration tests have no `lib.rs` beside them for proptest's regression files.
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&request(), |req| {
        runtime.block_on(fuzz.case(req, &accepted))
    });
    let (round, updates) = runtime.block_on(fuzz.round()).unwrap();
    runtime.block_on(fuzz.h.server.stop()).unwrap();
    eprintln!("answers: {:?}", fuzz.answers.borrow());
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(round, 1, "the round closed during the test");
    assert_eq!(
        updates - initial,
        accepted.get(),
        "updates counted vs. 202 answers"
    );
}
