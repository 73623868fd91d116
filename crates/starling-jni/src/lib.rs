//! A JNI binding of the Starling device session: the native half of the Java class
//! `dev.starling.Device` (its sources are in `java/`; see `README.md` for Android).
//!
//! Each `Java_dev_starling_Device_native*` function unpacks its Java arguments, runs the
//! step on the [`starling_ffi::device::Device`] behind the handle (the same safe layer the C
//! ABI wraps), and returns the outcome as a `dev.starling.Outcome`. A failure, and a Rust
//! panic (caught: it never unwinds into the JVM), is thrown as a
//! `dev.starling.StarlingException` with the status code of the C ABI and the server's code
//! name (`getCode()`). The handle is a `Box<Device>` turned into a `long`; the Java class
//! serialises calls on it (`synchronized`) and zeroes it on `close()`.

// JNI needs exported `#[no_mangle]` functions and a raw pointer kept in a Java `long`, both
// `unsafe_code` (denied across the workspace). The pointer is turned back into a reference
// in one place (`device`), with its `// SAFETY:` argument.
#![allow(unsafe_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use jni::objects::{JByteArray, JClass, JString, JThrowable, JValue};
use jni::sys::{jbyteArray, jfloat, jint, jlong, jobject, jstring};
use jni::JNIEnv;
use starling_core::Conditions;
use starling_ffi::device::{self, Device, Failure, Record, Status};

/// Why a call failed: a failure of the step, or of a JNI call (whose Java exception, if any,
/// is already pending).
enum Error {
    Starling(Failure),
    Jni(jni::errors::Error),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        Error::Starling(f)
    }
}

impl From<jni::errors::Error> for Error {
    fn from(e: jni::errors::Error) -> Self {
        Error::Jni(e)
    }
}

/// Throws `f` as a `dev.starling.StarlingException(message, code, status)`.
fn throw(env: &mut JNIEnv<'_>, f: &Failure) {
    let thrown = (|| -> jni::errors::Result<()> {
        let message = env.new_string(&f.message)?;
        let code = env.new_string(&f.code)?;
        let e = env.new_object(
            "dev/starling/StarlingException",
            "(Ljava/lang/String;Ljava/lang/String;I)V",
            &[
                JValue::Object(&message),
                JValue::Object(&code),
                JValue::Int(f.status as jint),
            ],
        )?;
        env.throw(JThrowable::from(e))
    })();
    if thrown.is_err() && !env.exception_check().unwrap_or(true) {
        // The exception class is missing (the Java sources were not packaged): say so.
        let _ = env.throw_new("java/lang/RuntimeException", &f.message);
    }
}

/// Runs `body` as one native call: a failure or a panic becomes a pending Java exception,
/// and the call answers `default` (which Java never sees, as the exception is thrown).
fn call<'local, T>(
    env: &mut JNIEnv<'local>,
    default: T,
    body: impl FnOnce(&mut JNIEnv<'local>) -> Result<T, Error>,
) -> T {
    let failure = match catch_unwind(AssertUnwindSafe(|| body(env))) {
        Ok(Ok(value)) => return value,
        Ok(Err(Error::Starling(f))) => f,
        // A Java exception is already pending (a JNI call threw): let it propagate.
        Ok(Err(Error::Jni(_))) if env.exception_check().unwrap_or(true) => return default,
        Ok(Err(Error::Jni(e))) => Failure::new(Status::Protocol, format!("JNI: {e}")),
        Err(payload) => Failure::panic(&*payload),
    };
    throw(env, &failure);
    default
}

/// The device behind a handle from `nativeOpen`.
fn device<'a>(handle: jlong) -> Result<&'a mut Device, Failure> {
    if handle == 0 {
        return Err(Failure::new(Status::State, "the device is closed"));
    }
    // SAFETY: a non-zero handle is a `Box<Device>` from `nativeOpen`, freed only by
    // `nativeClose`, after which Java zeroes it; Java's `synchronized` methods let one
    // thread at a time use it.
    Ok(unsafe { &mut *(handle as *mut Device) })
}

/// A required string argument.
fn text(env: &mut JNIEnv<'_>, s: &JString<'_>, what: &str) -> Result<String, Error> {
    if s.is_null() {
        return Err(Failure::argument(format!("{what} is null")).into());
    }
    Ok(env.get_string(s)?.into())
}

/// An optional string argument (`null`: none).
fn optional_text(
    env: &mut JNIEnv<'_>,
    s: &JString<'_>,
    what: &str,
) -> Result<Option<String>, Error> {
    if s.is_null() {
        Ok(None)
    } else {
        text(env, s, what).map(Some)
    }
}

/// Conditions as `dev.starling.Conditions` passes them: flags 1, 0 or -1 (unknown), the
/// battery level or NaN.
fn conditions(charging: jint, idle: jint, unmetered: jint, battery: jfloat) -> Conditions {
    let flag = |v: jint| (v >= 0).then_some(v > 0);
    Conditions {
        charging: flag(charging),
        idle: flag(idle),
        unmetered: flag(unmetered),
        battery: Some(battery).filter(|b| !b.is_nan()),
    }
}

/// A `dev.starling.Outcome` of `r`.
fn outcome(env: &mut JNIEnv<'_>, r: &Record) -> Result<jobject, Error> {
    let kind = env.new_string(r.kind.name())?;
    let reason = env.new_string(&r.reason)?;
    let o = env.new_object(
        "dev/starling/Outcome",
        "(Ljava/lang/String;JZJJDJDLjava/lang/String;)V",
        &[
            JValue::Object(&kind),
            JValue::Long(r.round as i64),
            JValue::Bool(u8::from(r.evaluation)),
            JValue::Long(r.version as i64),
            JValue::Long(r.examples as i64),
            JValue::Double(r.loss),
            JValue::Long(r.updates_in_round),
            JValue::Double(r.wait_secs),
            JValue::Object(&reason),
        ],
    )?;
    Ok(o.into_raw())
}

/// Runs a step on the device behind `handle`, answering its outcome.
fn step<'local>(
    env: &mut JNIEnv<'local>,
    handle: jlong,
    run: impl FnOnce(&mut JNIEnv<'local>, &mut Device) -> Result<Record, Error>,
) -> jobject {
    call(env, std::ptr::null_mut(), |env| {
        let record = run(env, device(handle)?)?;
        outcome(env, &record)
    })
}

/// `Device.nativeOpen(server, task, stateDir, caPemPath, credential)`: a handle.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeOpen<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    server: JString<'local>,
    task: JString<'local>,
    state_dir: JString<'local>,
    ca_pem_path: JString<'local>,
    credential: JString<'local>,
) -> jlong {
    call(&mut env, 0, |env| {
        let server = text(env, &server, "server")?;
        let task = text(env, &task, "task")?;
        let dir = text(env, &state_dir, "stateDir")?;
        let ca = optional_text(env, &ca_pem_path, "caPemPath")?;
        let credential = optional_text(env, &credential, "credential")?;
        let d = Device::open(
            &server,
            &task,
            Path::new(&dir),
            ca.as_deref().map(Path::new),
            credential.as_deref(),
        )?;
        Ok(Box::into_raw(Box::new(d)) as jlong)
    })
}

/// `Device.nativeClose(handle)`: frees the device (its folder stays).
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeClose<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) {
    call(&mut env, (), |_| {
        if handle != 0 {
            // SAFETY: a non-zero handle is a `Box<Device>` from `nativeOpen`; Java calls
            // `nativeClose` once and zeroes the handle.
            drop(unsafe { Box::from_raw(handle as *mut Device) });
        }
        Ok(())
    });
}

/// `Device.nativeEnroll(server, task, secret, label, caPemPath)`: the credential.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeEnroll<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    server: JString<'local>,
    task: JString<'local>,
    secret: JString<'local>,
    label: JString<'local>,
    ca_pem_path: JString<'local>,
) -> jstring {
    call(&mut env, std::ptr::null_mut(), |env| {
        let server = text(env, &server, "server")?;
        let task = text(env, &task, "task")?;
        let secret = text(env, &secret, "secret")?;
        let label = optional_text(env, &label, "label")?;
        let ca = optional_text(env, &ca_pem_path, "caPemPath")?;
        let credential = device::enroll(
            &server,
            &task,
            &secret,
            label.as_deref(),
            ca.as_deref().map(Path::new),
        )?;
        Ok(env.new_string(credential)?.into_raw())
    })
}

/// `Device.nativeCheckIn(handle, charging, idle, unmetered, battery)`.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeCheckIn<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    charging: jint,
    idle: jint,
    unmetered: jint,
    battery: jfloat,
) -> jobject {
    step(&mut env, handle, |_, d| {
        Ok(d.check_in(&conditions(charging, idle, unmetered, battery))?)
    })
}

/// `Device.nativeDownload(handle)`.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeDownload<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jobject {
    step(&mut env, handle, |_, d| Ok(d.download()?))
}

/// `Device.nativeTrainCsv(handle, path)`.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeTrainCsv<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    path: JString<'local>,
) -> jobject {
    step(&mut env, handle, |env, d| {
        let path = text(env, &path, "path")?;
        Ok(d.train_csv(Path::new(&path))?)
    })
}

/// `Device.nativeModel(handle)`: the checkpoint as safetensors.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeModel<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jbyteArray {
    call(&mut env, std::ptr::null_mut(), |env| {
        let bytes = device(handle)?.model()?;
        Ok(env.byte_array_from_slice(&bytes)?.into_raw())
    })
}

/// `Device.nativeSubmitParams(handle, safetensors, examples, loss)`.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeSubmitParams<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    safetensors: JByteArray<'local>,
    examples: jlong,
    loss: jfloat,
) -> jobject {
    step(&mut env, handle, |env, d| {
        if safetensors.is_null() {
            return Err(Failure::argument("safetensors is null").into());
        }
        let examples = u64::try_from(examples)
            .map_err(|_| Failure::argument(format!("examples is {examples}")))?;
        let bytes = env.convert_byte_array(&safetensors)?;
        Ok(d.submit_params(&bytes, examples, loss)?)
    })
}

/// `Device.nativeUpload(handle)`.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeUpload<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jobject {
    step(&mut env, handle, |_, d| Ok(d.upload()?))
}

/// `Device.nativeAdvance(handle, csvPath, charging, idle, unmetered, battery)`.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeAdvance<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    csv_path: JString<'local>,
    charging: jint,
    idle: jint,
    unmetered: jint,
    battery: jfloat,
) -> jobject {
    step(&mut env, handle, |env, d| {
        let csv = text(env, &csv_path, "csvPath")?;
        let c = conditions(charging, idle, unmetered, battery);
        Ok(d.advance(Path::new(&csv), &c)?)
    })
}

/// `Device.nativeReset(handle)`.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeReset<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) {
    call(&mut env, (), |_| Ok(device(handle)?.reset()?));
}

/// `Device.nativeStep(handle)`: the step's name.
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativeStep<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jstring {
    call(&mut env, std::ptr::null_mut(), |env| {
        let name = device(handle)?.step();
        Ok(env.new_string(name)?.into_raw())
    })
}

/// A panic in a native call reaches Java as a `StarlingException` with status 9 (tests
/// only: `DeviceTest` calls it to show a panic does not crash the JVM).
#[no_mangle]
pub extern "system" fn Java_dev_starling_Device_nativePanicForTests<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
) {
    call(&mut env, (), |_| -> Result<(), Error> {
        panic!("a panic inside a native call, on purpose")
    });
}
