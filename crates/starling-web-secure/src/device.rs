//! A browser device's side of one secure round in plain Rust: exactly what
//! `starling_client::secure::contribute` computes between its HTTP calls, with the step
//! bodies as the JSON the server speaks (`starling_core::wire::protocol`'s `SecureKeys`,
//! `NeighbourKeys`, `SecureEnvelopes`, `Survivors`, `SecureUnmasking`).
//!
//! [`SecureDevice::new`] builds the round's public parameters from the check-in's
//! `secure` assignment (`secagg::input::round_params`, so the server chooses neither the
//! degree nor the threshold) and encodes the update (`train::local_update`'s body, as the
//! main module makes it) into the ring with `InputSpec::encode_update` before any key is
//! out, so nothing about the update can fail after the round has counted the device. Then
//! one method per step, in order: [`SecureDevice::keys`], [`SecureDevice::shares`],
//! [`SecureDevice::masked_input`], [`SecureDevice::unmask`]; a step out of order is refused.

use std::collections::{BTreeMap, BTreeSet};

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use starling_core::secagg::input::round_params;
use starling_core::secagg::protocol::{Client, Params};
use starling_core::wire::params::Layout;
use starling_core::wire::protocol::{
    NeighbourKeys, SecureAssignment, SecureEnvelope, SecureEnvelopes, SecureKeys, SecureUnmasking,
    Survivors,
};
use starling_core::wire::update;
use zeroize::Zeroize;

/// Why a step cannot go on, for the person (the page shows it after "Secure round: ").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureError(String);

impl std::fmt::Display for SecureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SecureError {}

fn error(what: impl std::fmt::Display) -> SecureError {
    SecureError(what.to_string())
}

fn json<'a, T: serde::Deserialize<'a>>(text: &'a str, what: &str) -> Result<T, SecureError> {
    serde_json::from_str(text).map_err(|e| error(format!("{what} is not usable: {e}")))
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("the wire types always serialise")
}

fn index(i: u64) -> Result<usize, SecureError> {
    usize::try_from(i).map_err(error)
}

/// The step a [`SecureDevice`] is at: the next message it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Advertise its public keys.
    Keys,
    /// Send encrypted shares to the neighbours that advertised.
    Shares,
    /// Send the masked input.
    MaskedInput,
    /// Send unmasking shares for the survivors.
    Unmask,
    /// Its part is done (or a step failed): nothing more.
    Done,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Keys => "advertising keys",
            Step::Shares => "sharing keys",
            Step::MaskedInput => "sending the masked input",
            Step::Unmask => "unmasking",
            Step::Done => "done",
        }
    }
}

/// One device's part in one secure round: its place, the round's parameters, its encoded
/// input until it is masked, and the core's SecAgg+ [`Client`] with its secrets.
pub struct SecureDevice {
    index: usize,
    params: Params,
    rng: ChaCha20Rng,
    input: Vec<u32>,
    client: Option<Client>,
    step: Step,
}

// Secrets and the input stay out of any printout.
impl std::fmt::Debug for SecureDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureDevice")
            .field("index", &self.index)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl Drop for SecureDevice {
    fn drop(&mut self) {
        self.input.zeroize();
    }
}

impl SecureDevice {
    /// A device's part in secure round `round`, from the check-in answer's `secure`
    /// (`assignment`, JSON), the model's layout (`layout`, JSON `[[name, [dims…]], …]` in
    /// the model's order), the encoded update (`update`: `train::local_update`'s body) and
    /// 32 bytes of cryptographically secure randomness (`seed`) for every secret and the
    /// stochastic rounding. Refuses an assignment that does not fit the model or an update
    /// that is not one.
    pub fn new(
        assignment: &str,
        round: u64,
        layout: &str,
        update: &[u8],
        seed: [u8; 32],
    ) -> Result<Self, SecureError> {
        let a: SecureAssignment = json(assignment, "the round's assignment")?;
        let layout = Layout::new(json(layout, "the model's layout")?);
        let (params, spec) = round_params(round, &a, layout.numel()).map_err(error)?;
        let index = index(a.index)?;
        let mut rng = ChaCha20Rng::from_seed(seed);
        let view = update::decode(update, &layout, None)
            .map_err(|e| error(format!("the update is not usable: {e}")))?;
        let input = spec.encode_update(&params.fixed_point, &view, &mut rng);
        Ok(Self {
            index,
            params,
            rng,
            input,
            client: None,
            step: Step::Keys,
        })
    }

    /// The device's place in the round.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The next message this device makes.
    pub fn step(&self) -> Step {
        self.step
    }

    fn expect(&mut self, step: Step) -> Result<(), SecureError> {
        if self.step != step {
            return Err(error(format!(
                "this device is {}, not {}",
                self.step.name(),
                step.name()
            )));
        }
        Ok(())
    }

    /// A failed step ends the device's part: its secrets go with it.
    fn fail<T>(&mut self, e: impl std::fmt::Display) -> Result<T, SecureError> {
        self.step = Step::Done;
        self.client = None;
        self.input.zeroize();
        Err(error(e))
    }

    /// Step 1: the body of `POST {secure_url}/keys` (`SecureKeys` JSON): two fresh X25519
    /// public keys.
    pub fn keys(&mut self) -> Result<String, SecureError> {
        self.expect(Step::Keys)?;
        let (client, keys) = Client::new(self.index, self.params, &mut self.rng);
        self.client = Some(client);
        self.step = Step::Shares;
        Ok(to_json(&SecureKeys::from(&keys)))
    }

    /// Step 2: from the answer of `GET {secure_url}/keys` (`NeighbourKeys` JSON), the body
    /// of `POST {secure_url}/shares` (`SecureEnvelopes` JSON): shares of this device's
    /// secrets encrypted for each neighbour that advertised.
    pub fn shares(&mut self, neighbour_keys: &str) -> Result<String, SecureError> {
        self.expect(Step::Shares)?;
        let result = (|| {
            let answer: NeighbourKeys = json(neighbour_keys, "the neighbours' keys")?;
            let mut peers = BTreeMap::new();
            for (i, k) in answer.keys {
                peers.insert(
                    index(i)?,
                    k.decode()
                        .map_err(|e| error(format!("a neighbour's key: {e}")))?,
                );
            }
            let client = self.client.as_mut().expect("keys made the client");
            let envelopes = client.share_keys(&peers, &mut self.rng).map_err(error)?;
            Ok::<_, SecureError>(SecureEnvelopes {
                envelopes: envelopes.iter().map(SecureEnvelope::from).collect(),
            })
        })();
        match result {
            Ok(envelopes) => {
                self.step = Step::MaskedInput;
                Ok(to_json(&envelopes))
            }
            Err(e) => self.fail(e),
        }
    }

    /// Step 3: from the answer of `GET {secure_url}/shares` (`SecureEnvelopes` JSON: the
    /// envelopes addressed to this device), the body of `POST {secure_url}/input`: the
    /// masked input, 4 bytes per value, little-endian. The unmasked input is wiped.
    pub fn masked_input(&mut self, envelopes: &str) -> Result<Vec<u8>, SecureError> {
        self.expect(Step::MaskedInput)?;
        let result = (|| {
            let answer: SecureEnvelopes = json(envelopes, "the envelopes")?;
            let mine = answer
                .envelopes
                .iter()
                .map(|e| e.decode().map_err(error))
                .collect::<Result<Vec<_>, SecureError>>()?;
            let client = self.client.as_mut().expect("keys made the client");
            client.masked_input(&mine, &self.input).map_err(error)
        })();
        self.input.zeroize();
        match result {
            Ok(y) => {
                self.step = Step::Unmask;
                Ok(y.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            Err(e) => self.fail(e),
        }
    }

    /// Step 4: from the answer of `GET {secure_url}/survivors` (`Survivors` JSON), the body
    /// of `POST {secure_url}/unmask` (`SecureUnmasking` JSON): for each neighbour whose
    /// shares this device holds, its self-mask seed's share if it survived, else its mask
    /// key's. The device's secrets are dropped after.
    pub fn unmask(&mut self, survivors: &str) -> Result<String, SecureError> {
        self.expect(Step::Unmask)?;
        let result = (|| {
            let answer: Survivors = json(survivors, "the survivors")?;
            let survivors = answer
                .survivors
                .into_iter()
                .map(index)
                .collect::<Result<BTreeSet<_>, _>>()?;
            let client = self.client.as_ref().expect("keys made the client");
            let u = client.unmask(&survivors).map_err(error)?;
            Ok::<_, SecureError>(SecureUnmasking::from(&u))
        })();
        self.step = Step::Done;
        self.client = None;
        result.map(|u| to_json(&u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use starling_core::secagg::input::InputSpec;
    use starling_core::secagg::protocol::{AdvertiseKeys, Aggregator, Envelope, Unmasking};
    use starling_core::tensor::Tensor;
    use starling_core::wire::protocol::{to_hex, SecureAssignment, SecureShare};
    use starling_core::wire::update::UpdateMeta;
    use starling_core::Parameters;

    const CAP: u64 = 40;
    const CLIP: f64 = 10.0;
    const BITS: u32 = 16;

    fn layout() -> Layout {
        Layout::new(vec![("W".into(), vec![1, 2]), ("b".into(), vec![1])])
    }

    fn layout_json() -> String {
        serde_json::to_string(layout().entries()).unwrap()
    }

    fn assignment(index: usize, devices: usize, min_survivors: usize) -> String {
        to_json(&SecureAssignment {
            index: index as u64,
            devices: devices as u64,
            min_survivors: min_survivors as u64,
            input_bits: BITS,
            graph_seed: to_hex(&[7u8; 32]),
            input_len: layout().numel() as u64 + 4,
            clip: CLIP,
            loss_bound: 100.0,
            weight_cap: Some(CAP),
            skellam_mu: None,
            secure_url: "/v1/tasks/t/rounds/3/secagg".into(),
        })
    }

    /// Device `i`'s update: a delta, its example count, loss and accuracy.
    fn update_of(i: usize) -> (Vec<f32>, u64, f32, f32) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        let delta: Vec<f32> = (0..3).map(|_| rng.random_range(-1.0..1.0)).collect();
        (delta, 10 + 7 * i as u64, 0.5 + i as f32, 0.25)
    }

    fn body_of(i: usize) -> Vec<u8> {
        let (d, examples, loss, accuracy) = update_of(i);
        let delta = Parameters::new(vec![
            (
                "W".into(),
                Tensor::new(vec![1, 2], d[..2].to_vec()).unwrap(),
            ),
            ("b".into(), Tensor::new(vec![1], d[2..].to_vec()).unwrap()),
        ])
        .unwrap();
        update::encode(
            &delta,
            &UpdateMeta {
                base_version: 0,
                examples,
                loss: Some(loss),
                accuracy: Some(accuracy),
                token: "t".into(),
            },
        )
    }

    fn wire_keys(json: &str) -> AdvertiseKeys {
        let k: SecureKeys = serde_json::from_str(json).unwrap();
        k.decode().unwrap()
    }

    fn neighbour_keys(agg: &Aggregator, i: usize) -> String {
        to_json(&NeighbourKeys {
            keys: agg
                .keys_for(i)
                .into_iter()
                .map(|(j, k)| (j as u64, SecureKeys::from(&k)))
                .collect(),
        })
    }

    fn envelopes_for(agg: &Aggregator, i: usize) -> String {
        to_json(&SecureEnvelopes {
            envelopes: agg
                .envelopes_for(i)
                .iter()
                .map(SecureEnvelope::from)
                .collect(),
        })
    }

    fn from_wire_envelopes(json: &str) -> Vec<Envelope> {
        let e: SecureEnvelopes = serde_json::from_str(json).unwrap();
        e.envelopes.iter().map(|e| e.decode().unwrap()).collect()
    }

    fn from_wire_unmasking(from: usize, json: &str) -> Unmasking {
        let u: SecureUnmasking = serde_json::from_str(json).unwrap();
        let shares = |v: Vec<SecureShare>| v.iter().map(|s| s.decode().unwrap()).collect();
        Unmasking {
            from,
            seeds: shares(u.seeds),
            keys: shares(u.keys),
        }
    }

    /// A device of an in-process round: the browser's, through this module's JSON, or a
    /// native one, the core's `Client` driven directly as `starling device` drives it.
    enum Dev {
        Web(SecureDevice),
        Native {
            client: Client,
            input: Vec<u32>,
            rng: ChaCha20Rng,
        },
    }

    /// A whole round against the core's `Aggregator` (the server's side): `devices`
    /// devices, those in `native` native and the rest browser devices; those in
    /// `drop_after_sharing` share their keys and then vanish. Returns the decoded mean
    /// update, mean loss and the survivors.
    fn round(
        devices: usize,
        native: &[usize],
        drop_after_sharing: &[usize],
    ) -> (Vec<f64>, f64, usize) {
        let (params, spec) = round_params(
            3,
            &serde_json::from_str(&assignment(0, devices, 3)).unwrap(),
            layout().numel(),
        )
        .unwrap();
        let mut agg = Aggregator::new(params);
        let mut devs: Vec<Dev> = (0..devices)
            .map(|i| {
                let seed = [i as u8 + 1; 32];
                if native.contains(&i) {
                    let mut rng = ChaCha20Rng::from_seed(seed);
                    let body = body_of(i);
                    let view = update::decode(&body, &layout(), None).unwrap();
                    let input = spec.encode_update(&params.fixed_point, &view, &mut rng);
                    let (client, keys) = Client::new(i, params, &mut rng);
                    agg.advertise(i, keys).unwrap();
                    Dev::Native { client, input, rng }
                } else {
                    let mut d = SecureDevice::new(
                        &assignment(i, devices, 3),
                        3,
                        &layout_json(),
                        &body_of(i),
                        seed,
                    )
                    .unwrap();
                    assert_eq!(d.index(), i);
                    agg.advertise(i, wire_keys(&d.keys().unwrap())).unwrap();
                    Dev::Web(d)
                }
            })
            .collect();
        for (i, d) in devs.iter_mut().enumerate() {
            let envelopes = match d {
                Dev::Web(d) => from_wire_envelopes(&d.shares(&neighbour_keys(&agg, i)).unwrap()),
                Dev::Native { client, rng, .. } => {
                    client.share_keys(&agg.keys_for(i), rng).unwrap()
                }
            };
            agg.share(i, envelopes).unwrap();
        }
        for (i, d) in devs.iter_mut().enumerate() {
            if drop_after_sharing.contains(&i) {
                continue;
            }
            let y = match d {
                Dev::Web(d) => {
                    let bytes = d.masked_input(&envelopes_for(&agg, i)).unwrap();
                    assert_eq!(bytes.len(), 4 * params.len);
                    bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                        .collect()
                }
                Dev::Native { client, input, .. } => {
                    client.masked_input(&agg.envelopes_for(i), input).unwrap()
                }
            };
            agg.masked_input(i, &y).unwrap();
        }
        let survivors = agg.survivors().unwrap();
        let wire = to_json(&Survivors {
            survivors: survivors.iter().map(|&i| i as u64).collect(),
        });
        for &i in &survivors {
            let u = match &mut devs[i] {
                Dev::Web(d) => {
                    let u = d.unmask(&wire).unwrap();
                    assert_eq!(d.step(), Step::Done);
                    from_wire_unmasking(i, &u)
                }
                Dev::Native { client, .. } => client.unmask(&survivors).unwrap(),
            };
            agg.unmask(u).unwrap();
        }
        let (sum, n) = agg.finish().unwrap();
        let ws = spec
            .decode_sum(&params.fixed_point, &sum, &layout(), n)
            .unwrap();
        (ws.mean().unwrap(), ws.mean_loss().unwrap(), n)
    }

    /// Plain FedAvg of the devices not in `dropped`, with the round's capped weights.
    fn plain(devices: usize, dropped: &[usize]) -> (Vec<f64>, f64) {
        let mut sum = [0.0f64; 3];
        let (mut weight, mut loss) = (0.0, 0.0);
        for i in (0..devices).filter(|i| !dropped.contains(i)) {
            let (d, examples, l, _) = update_of(i);
            let w = examples.min(CAP) as f64 / CAP as f64;
            for (s, v) in sum.iter_mut().zip(d) {
                *s += w * f64::from(v);
            }
            weight += w;
            loss += w * f64::from(l);
        }
        (sum.iter().map(|s| s / weight).collect(), loss / weight)
    }

    /// One level of the ring's rounding, scaled back to an update's values.
    fn level() -> f64 {
        CLIP / f64::from((1u32 << (BITS - 1)) - 1)
    }

    #[test]
    fn browser_devices_sum_with_the_cores_aggregator_like_plain_fedavg() {
        let (mean, loss, n) = round(5, &[], &[]);
        assert_eq!(n, 5);
        let (want, want_loss) = plain(5, &[]);
        for (m, w) in mean.iter().zip(&want) {
            assert!((m - w).abs() < 4.0 * level(), "{m} vs {w}");
        }
        assert!((loss - want_loss).abs() < 0.05, "{loss} vs {want_loss}");
    }

    #[test]
    fn a_device_that_drops_after_sharing_is_unmasked_out_of_the_sum() {
        let (mean, _, n) = round(6, &[], &[2]);
        assert_eq!(n, 5);
        let (want, _) = plain(6, &[2]);
        for (m, w) in mean.iter().zip(&want) {
            assert!((m - w).abs() < 4.0 * level(), "{m} vs {w}");
        }
    }

    /// Browser devices and native ones (the core's `Client` as `starling device` runs it)
    /// in one round, one native device dropping out after sharing: the masks cancel across
    /// the two kinds.
    #[test]
    fn browser_and_native_devices_share_one_round() {
        let (mean, loss, n) = round(6, &[0, 3, 4], &[4]);
        assert_eq!(n, 5);
        let (want, want_loss) = plain(6, &[4]);
        for (m, w) in mean.iter().zip(&want) {
            assert!((m - w).abs() < 4.0 * level(), "{m} vs {w}");
        }
        assert!((loss - want_loss).abs() < 0.05, "{loss} vs {want_loss}");
    }

    /// The browser's input is the native device's: the same encoding of the same body with
    /// the same generator's draws (the core's `encode_update` after `round_params`).
    #[test]
    fn the_input_is_the_cores_encoding_of_the_update() {
        let a = assignment(1, 4, 3);
        let seed = [9u8; 32];
        let d = SecureDevice::new(&a, 3, &layout_json(), &body_of(1), seed).unwrap();
        let (params, spec): (Params, InputSpec) =
            round_params(3, &serde_json::from_str(&a).unwrap(), 3).unwrap();
        let body = body_of(1);
        let view = update::decode(&body, &layout(), None).unwrap();
        let want = spec.encode_update(
            &params.fixed_point,
            &view,
            &mut ChaCha20Rng::from_seed(seed),
        );
        assert_eq!(d.input, want);
        assert_eq!(
            format!("{d:?}"),
            "SecureDevice { index: 1, step: Keys, .. }"
        );
    }

    /// Distributed DP: an assignment with `skellam_mu` makes the browser add the core's
    /// Skellam noise to every update value and report no loss or accuracy, exactly as a
    /// native device does.
    #[test]
    fn under_distributed_dp_the_browser_adds_the_noise() {
        let mut a: SecureAssignment = serde_json::from_str(&assignment(1, 4, 3)).unwrap();
        a.weight_cap = None;
        a.skellam_mu = Some(5_000.0);
        let json = to_json(&a);
        let seed = [3u8; 32];
        let d = SecureDevice::new(&json, 3, &layout_json(), &body_of(1), seed).unwrap();
        let (params, spec) = round_params(3, &a, 3).unwrap();
        assert_eq!(spec.noise_mu, Some(5_000.0));
        let body = body_of(1);
        let view = update::decode(&body, &layout(), None).unwrap();
        let noised = spec.encode_update(
            &params.fixed_point,
            &view,
            &mut ChaCha20Rng::from_seed(seed),
        );
        assert_eq!(d.input, noised);
        let plain = InputSpec {
            noise_mu: None,
            ..spec
        }
        .encode_update(
            &params.fixed_point,
            &view,
            &mut ChaCha20Rng::from_seed(seed),
        );
        assert_ne!(d.input[..3], plain[..3], "the update values carry noise");
        let fp = params.fixed_point;
        assert_eq!(
            fp.decode(&d.input[4..]),
            vec![0.0; 3],
            "no loss or accuracy"
        );
    }

    #[test]
    fn unusable_assignments_updates_and_answers_are_refused() {
        let body = body_of(0);
        // A model of another size than the round's.
        let other = serde_json::to_string(&[("W", vec![1, 3]), ("b", vec![1])]).unwrap();
        let e = SecureDevice::new(&assignment(0, 4, 3), 3, &other, &body, [1; 32]).unwrap_err();
        assert!(e.to_string().contains("this model needs 8"), "{e}");
        let e = SecureDevice::new("{}", 3, &layout_json(), &body, [1; 32]).unwrap_err();
        assert!(e.to_string().contains("assignment is not usable"), "{e}");
        let e = SecureDevice::new(&assignment(0, 4, 3), 3, &layout_json(), b"nope", [1; 32])
            .unwrap_err();
        assert!(e.to_string().contains("update is not usable"), "{e}");

        let mut d =
            SecureDevice::new(&assignment(0, 4, 3), 3, &layout_json(), &body, [1; 32]).unwrap();
        // Out of order.
        let e = d.shares(r#"{"keys": []}"#).unwrap_err();
        assert!(e.to_string().contains("not sharing keys"), "{e}");
        d.keys().unwrap();
        assert!(d.keys().is_err());
        // Too few neighbours advertised: the device's part ends.
        let e = d.shares(r#"{"keys": []}"#).unwrap_err();
        assert!(e.to_string().contains("neighbours taking part"), "{e}");
        assert_eq!(d.step(), Step::Done);
        assert!(d.input.iter().all(|&v| v == 0), "the input is wiped");
        assert!(d.masked_input(r#"{"envelopes": []}"#).is_err());
    }
}
