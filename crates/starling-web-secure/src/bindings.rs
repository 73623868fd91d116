//! The JavaScript face of [`crate::device`], through `wasm-bindgen`: `SecureDevice`, whose
//! methods take the server's answers as the JSON text `fetch` gave the page and return the
//! next request's body (JSON text, or the masked input's bytes as a `Uint8Array`).

use wasm_bindgen::prelude::*;

use crate::device::SecureDevice;

fn js(e: crate::device::SecureError) -> JsError {
    JsError::new(&e.to_string())
}

/// One device's part in one secure round (see [`SecureDevice`]).
#[wasm_bindgen(js_name = SecureDevice)]
pub struct WebSecureDevice(SecureDevice);

#[wasm_bindgen(js_class = SecureDevice)]
impl WebSecureDevice {
    /// `assignment`: the check-in answer's `secure`, as JSON; `round`: the answer's round;
    /// `layout`: the model's `[[name, [dims…]], …]` as JSON; `update`: the encoded update
    /// (the main module's `takeUpdate()`); `seed`: 32 bytes from `crypto.getRandomValues`.
    /// Throws when the assignment does not fit the model or the update is not one.
    #[wasm_bindgen(constructor)]
    pub fn new(
        assignment: &str,
        round: f64,
        layout: &str,
        update: &[u8],
        seed: &[u8],
    ) -> Result<WebSecureDevice, JsError> {
        if !(round.is_finite() && round >= 0.0 && round.fract() == 0.0 && round <= 9.0e15) {
            return Err(JsError::new("the round is not a round number"));
        }
        let seed = <[u8; 32]>::try_from(seed)
            .map_err(|_| JsError::new("the seed must be 32 random bytes"))?;
        SecureDevice::new(assignment, round as u64, layout, update, seed)
            .map(WebSecureDevice)
            .map_err(js)
    }

    /// The device's place in the round.
    #[wasm_bindgen(getter)]
    pub fn index(&self) -> usize {
        self.0.index()
    }

    /// Step 1: the body of `POST {secure_url}/keys`.
    pub fn keys(&mut self) -> Result<String, JsError> {
        self.0.keys().map_err(js)
    }

    /// Step 2: from `GET {secure_url}/keys`'s answer, the body of `POST {secure_url}/shares`.
    pub fn shares(&mut self, neighbour_keys: &str) -> Result<String, JsError> {
        self.0.shares(neighbour_keys).map_err(js)
    }

    /// Step 3: from `GET {secure_url}/shares`'s answer, the body of `POST
    /// {secure_url}/input` (`application/octet-stream`).
    #[wasm_bindgen(js_name = maskedInput)]
    pub fn masked_input(&mut self, envelopes: &str) -> Result<Vec<u8>, JsError> {
        self.0.masked_input(envelopes).map_err(js)
    }

    /// Step 4: from `GET {secure_url}/survivors`'s answer, the body of `POST
    /// {secure_url}/unmask`.
    pub fn unmask(&mut self, survivors: &str) -> Result<String, JsError> {
        self.0.unmask(survivors).map_err(js)
    }
}

impl std::fmt::Debug for WebSecureDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
