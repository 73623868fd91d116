//! The SecAgg+ protocol (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) as two state
//! machines over plain messages: a device ([`Client`]) and the server ([`Aggregator`]), for
//! any transport. Four steps:
//!
//! 1. **Advertise keys.** Each device draws two X25519 key pairs, one to encrypt shares for
//!    its neighbours and one to agree mask seeds with them, and sends the public keys.
//! 2. **Share keys.** Each device draws a self-mask seed, splits it and its mask secret key
//!    into Shamir shares (`threshold` of its `degree` neighbours recover them), and encrypts
//!    one share of each for every neighbour that advertised keys, with ChaCha20-Poly1305
//!    under a key both derive (X25519, then HKDF-SHA256). The server relays the ciphertexts
//!    it cannot read.
//! 3. **Masked input.** Each device adds to its input, in the ring Z_(2^bits), the expansion
//!    of its self-mask seed and, for every neighbour that shared keys, the expansion of their
//!    agreed pairwise seed (plus for the smaller index, minus for the larger), each a
//!    ChaCha20 stream. The server folds each masked vector into one running sum at once and
//!    keeps nothing else of it.
//! 4. **Unmask.** For every neighbour, a surviving device reveals the share of the self-mask
//!    seed if that neighbour sent its masked input, and the share of its mask secret key if
//!    it dropped out after sharing: never both. The server rebuilds the seeds and keys from
//!    `threshold` shares each, removes the survivors' self masks and the dropped devices'
//!    pairwise masks, and is left with the sum of the survivors' inputs.
//!
//! Threat model: an honest-but-curious server and devices that may drop out at any step. A
//! malicious server could tell different devices different survivor sets (and so learn a
//! device's input); that needs the consistency check of Bonawitz et al.'s malicious variant,
//! with keys signed by device credentials, which this does not implement.

use std::collections::{BTreeMap, BTreeSet};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::{RngCore, SeedableRng};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::encode::{add_into, sub_from, FixedPoint};
use super::graph;
use super::shamir::{self, Share, SECRET_LEN};

/// The salt of every key derivation.
const SALT: &[u8] = b"starling-secagg-v1";
/// Bytes of a decrypted envelope: owner (8), then two shares of (1 + 32).
const PLAINTEXT_LEN: usize = 8 + 2 * (1 + SECRET_LEN);

/// Why a step cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    /// Fewer neighbours took part than the threshold needs.
    #[error("device {device} has {have} neighbours taking part; it needs {need}")]
    TooFewNeighbours {
        /// The device.
        device: usize,
        /// Neighbours with keys.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// Fewer devices sent masked inputs than the round needs.
    #[error("{have} devices sent masked inputs; the round needs {need}")]
    TooFewSurvivors {
        /// Masked inputs.
        have: usize,
        /// Needed.
        need: usize,
    },
    /// Not enough shares came back to rebuild a device's secret.
    #[error("only {have} shares of device {device}'s {what} came back; {need} are needed")]
    Reconstruct {
        /// The device.
        device: usize,
        /// Which secret.
        what: &'static str,
        /// Shares received.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// A message from or about a device that has no place in this step.
    #[error("device {device}: {reason}")]
    Unexpected {
        /// The device.
        device: usize,
        /// Why.
        reason: String,
    },
    /// A ciphertext does not open: forged, corrupted, or not for this device.
    #[error("an encrypted share from device {0} does not open")]
    Decrypt(usize),
    /// A public key of low order (no shared secret).
    #[error("device {0}'s public key is unusable")]
    BadKey(usize),
    /// A vector of the wrong length.
    #[error("a vector has {got} values; the round has {expected}")]
    Length {
        /// Received.
        got: usize,
        /// Expected.
        expected: usize,
    },
}

/// A round's public parameters, the same for the server and every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The round number (bound into every derived key).
    pub round: u64,
    /// Devices at the start (indices 0..devices).
    pub devices: usize,
    /// Neighbours per device.
    pub degree: usize,
    /// Shares that rebuild a device's secrets (of its `degree`).
    pub threshold: usize,
    /// Masked inputs the round needs; fewer, and it is abandoned.
    pub min_survivors: usize,
    /// The seed of the neighbourhood graph.
    pub graph_seed: [u8; 32],
    /// The ring and its encoding.
    pub fixed_point: FixedPoint,
    /// Values in one input.
    pub len: usize,
}

impl Params {
    /// Defaults for `devices` devices: about 6 log2(n) neighbours each (everyone when fewer)
    /// and a threshold of a third of them plus one, so that a device's secrets survive up to
    /// two thirds of its neighbours dropping out while fewer than a third of them, colluding,
    /// learn nothing; and at least `min_survivors` masked inputs.
    pub fn new(
        round: u64,
        devices: usize,
        min_survivors: usize,
        fixed_point: FixedPoint,
        len: usize,
        graph_seed: [u8; 32],
    ) -> Self {
        let degree = graph::default_degree(devices).min(devices.saturating_sub(1));
        Self {
            round,
            devices,
            degree,
            threshold: degree / 3 + 1,
            min_survivors,
            graph_seed,
            fixed_point,
            len,
        }
    }

    /// Every device's neighbours.
    pub fn graph(&self) -> Vec<Vec<usize>> {
        graph::neighbours(self.devices, self.degree, self.graph_seed)
    }
}

/// A device's public keys (step 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvertiseKeys {
    /// For encrypting shares to this device.
    pub encryption: [u8; 32],
    /// For agreeing pairwise mask seeds with this device.
    pub masking: [u8; 32],
}

/// A share of one device's secrets, encrypted for one neighbour (step 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The device whose secrets these are.
    pub from: usize,
    /// The neighbour it is for.
    pub to: usize,
    /// ChaCha20-Poly1305 of the shares.
    pub ciphertext: Vec<u8>,
}

/// What a surviving device reveals (step 4): shares of self-mask seeds of survivors, and of
/// mask keys of devices that dropped after sharing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unmasking {
    /// The revealing device.
    pub from: usize,
    /// `(owner, share of its self-mask seed)`.
    pub seeds: Vec<(usize, Share)>,
    /// `(owner, share of its mask secret key)`.
    pub keys: Vec<(usize, Share)>,
}

fn derive(shared: &[u8; 32], label: &[u8], round: u64, a: usize, b: usize) -> [u8; 32] {
    let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
    let mut info = Vec::with_capacity(label.len() + 24);
    info.extend_from_slice(label);
    info.extend_from_slice(&round.to_le_bytes());
    info.extend_from_slice(&lo.to_le_bytes());
    info.extend_from_slice(&hi.to_le_bytes());
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(SALT), shared)
        .expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// Whether an X25519 public key can agree a secret at all: a key of low order gives every
/// secret key the all-zero result (`x25519-dalek`'s `was_contributory` is false for it, as
/// RFC 7748 section 6.1 recommends checking), so one fixed scalar tells.
pub fn usable_key(public: &[u8; 32]) -> bool {
    StaticSecret::from([0x5a; 32])
        .diffie_hellman(&PublicKey::from(*public))
        .was_contributory()
}

fn agree(secret: &StaticSecret, public: &[u8; 32], peer: usize) -> Result<[u8; 32], SecAggError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(SecAggError::BadKey(peer));
    }
    Ok(*shared.as_bytes())
}

/// The ChaCha20 expansion of a seed into `len` ring elements.
pub fn expand(seed: &[u8; 32], len: usize, mask: u32) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(*seed);
    (0..len).map(|_| rng.next_u32() & mask).collect()
}

fn nonce(from: usize, to: usize) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&(from as u32).to_le_bytes());
    n[4..8].copy_from_slice(&(to as u32).to_le_bytes());
    Nonce::from(n)
}

fn secret_from(rng: &mut impl RngCore) -> [u8; 32] {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    b
}

/// A device's side of one round.
pub struct Client {
    id: usize,
    params: Params,
    encryption: StaticSecret,
    masking: StaticSecret,
    self_seed: [u8; 32],
    neighbours: Vec<usize>,
    peers: BTreeMap<usize, AdvertiseKeys>,
    /// The neighbours whose shares this device holds: those that shared keys.
    held: BTreeMap<usize, (Share, Share)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("neighbours", &self.neighbours.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Step 1: a device's keys for the round; `rng` must be a cryptographically secure
    /// generator (every secret comes from it).
    pub fn new(id: usize, params: Params, rng: &mut impl RngCore) -> (Self, AdvertiseKeys) {
        let encryption = StaticSecret::from(secret_from(rng));
        let masking = StaticSecret::from(secret_from(rng));
        let keys = AdvertiseKeys {
            encryption: PublicKey::from(&encryption).to_bytes(),
            masking: PublicKey::from(&masking).to_bytes(),
        };
        let neighbours = params.graph().get(id).cloned().unwrap_or_default();
        let client = Self {
            id,
            params,
            encryption,
            masking,
            self_seed: secret_from(rng),
            neighbours,
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
        };
        (client, keys)
    }

    /// Step 2: shares of this device's self-mask seed and mask key, encrypted for each
    /// neighbour among the devices whose keys the server relays.
    pub fn share_keys(
        &mut self,
        keys: &BTreeMap<usize, AdvertiseKeys>,
        rng: &mut impl RngCore,
    ) -> Result<Vec<Envelope>, SecAggError> {
        self.peers = self
            .neighbours
            .iter()
            .filter_map(|j| keys.get(j).map(|k| (*j, *k)))
            .collect();
        let need = self.params.threshold;
        if self.peers.len() < need {
            return Err(SecAggError::TooFewNeighbours {
                device: self.id,
                have: self.peers.len(),
                need,
            });
        }
        // Share points: a neighbour's place in this device's neighbour list, plus one.
        let xs: Vec<u8> = self
            .peers
            .keys()
            .map(|j| self.point(*j))
            .collect::<Result<_, _>>()?;
        let seeds = shamir::split(&self.self_seed, need, &xs, rng)
            .map_err(|e| self.unexpected(e.to_string()))?;
        let mask_key = self.masking.to_bytes();
        let keys_shares =
            shamir::split(&mask_key, need, &xs, rng).map_err(|e| self.unexpected(e.to_string()))?;
        let mut out = Vec::with_capacity(self.peers.len());
        for ((j, peer), (seed, key)) in self.peers.iter().zip(seeds.iter().zip(&keys_shares)) {
            let shared = agree(&self.encryption, &peer.encryption, *j)?;
            let cipher = ChaCha20Poly1305::new(Key::from_slice(&derive(
                &shared,
                b"share-encryption",
                self.params.round,
                self.id,
                *j,
            )));
            let mut plain = Vec::with_capacity(PLAINTEXT_LEN);
            plain.extend_from_slice(&(self.id as u64).to_le_bytes());
            for s in [seed, key] {
                plain.push(s.x);
                plain.extend_from_slice(&s.y);
            }
            let ciphertext = cipher
                .encrypt(
                    &nonce(self.id, *j),
                    Payload {
                        msg: &plain,
                        aad: &self.params.round.to_le_bytes(),
                    },
                )
                .map_err(|_| self.unexpected("encryption failed".into()))?;
            plain.fill(0);
            out.push(Envelope {
                from: self.id,
                to: *j,
                ciphertext,
            });
        }
        Ok(out)
    }

    fn point(&self, neighbour: usize) -> Result<u8, SecAggError> {
        self.neighbours
            .iter()
            .position(|j| *j == neighbour)
            .and_then(|p| u8::try_from(p + 1).ok())
            .ok_or_else(|| self.unexpected(format!("{neighbour} is no neighbour (or too many)")))
    }

    fn unexpected(&self, reason: String) -> SecAggError {
        SecAggError::Unexpected {
            device: self.id,
            reason,
        }
    }

    /// Step 3: opens the shares the neighbours sent this device, then masks `input` (encoded
    /// in the round's ring) with the self mask and a pairwise mask per neighbour that shared.
    pub fn masked_input(
        &mut self,
        envelopes: &[Envelope],
        input: &[u32],
    ) -> Result<Vec<u32>, SecAggError> {
        if input.len() != self.params.len {
            return Err(SecAggError::Length {
                got: input.len(),
                expected: self.params.len,
            });
        }
        for e in envelopes {
            let Some(peer) = self.peers.get(&e.from).filter(|_| e.to == self.id) else {
                return Err(self.unexpected(format!("an envelope from {} to {}", e.from, e.to)));
            };
            let shared = agree(&self.encryption, &peer.encryption, e.from)?;
            let cipher = ChaCha20Poly1305::new(Key::from_slice(&derive(
                &shared,
                b"share-encryption",
                self.params.round,
                self.id,
                e.from,
            )));
            let plain = cipher
                .decrypt(
                    &nonce(e.from, self.id),
                    Payload {
                        msg: &e.ciphertext,
                        aad: &self.params.round.to_le_bytes(),
                    },
                )
                .map_err(|_| SecAggError::Decrypt(e.from))?;
            if plain.len() != PLAINTEXT_LEN || plain[..8] != (e.from as u64).to_le_bytes() {
                return Err(SecAggError::Decrypt(e.from));
            }
            let share = |at: usize| Share {
                x: plain[at],
                y: plain[at + 1..at + 1 + SECRET_LEN]
                    .try_into()
                    .expect("32 bytes"),
            };
            self.held
                .insert(e.from, (share(8), share(8 + 1 + SECRET_LEN)));
        }
        let mask = self.params.fixed_point.ring_mask();
        let len = self.params.len;
        let mut y = input.to_vec();
        add_into(&mut y, &expand(&self.self_seed, len, mask), mask);
        for j in self.held.keys() {
            let peer = &self.peers[j];
            let shared = agree(&self.masking, &peer.masking, *j)?;
            let seed = derive(&shared, b"pairwise-mask", self.params.round, self.id, *j);
            let m = expand(&seed, len, mask);
            if self.id < *j {
                add_into(&mut y, &m, mask);
            } else {
                sub_from(&mut y, &m, mask);
            }
        }
        Ok(y)
    }

    /// Step 4: for each neighbour whose shares this device holds, the share of its self-mask
    /// seed if it is among `survivors`, else the share of its mask key. A device the server
    /// does not count among the survivors reveals nothing.
    pub fn unmask(&self, survivors: &BTreeSet<usize>) -> Result<Unmasking, SecAggError> {
        if !survivors.contains(&self.id) {
            return Err(self.unexpected("not among the survivors".into()));
        }
        let mut out = Unmasking {
            from: self.id,
            ..Unmasking::default()
        };
        for (owner, (seed, key)) in &self.held {
            if survivors.contains(owner) {
                out.seeds.push((*owner, seed.clone()));
            } else {
                out.keys.push((*owner, key.clone()));
            }
        }
        Ok(out)
    }
}

/// The server's side of one round. It keeps public keys, relays ciphertexts it cannot read,
/// and folds every masked input into one running sum at once.
#[derive(Debug)]
pub struct Aggregator {
    params: Params,
    graph: Vec<Vec<usize>>,
    keys: BTreeMap<usize, AdvertiseKeys>,
    sharers: BTreeSet<usize>,
    mailbox: BTreeMap<usize, Vec<Envelope>>,
    sum: Vec<u32>,
    masked: BTreeSet<usize>,
    seeds: BTreeMap<usize, Vec<Share>>,
    mask_keys: BTreeMap<usize, Vec<Share>>,
    unmasked: BTreeSet<usize>,
}

impl Aggregator {
    /// A round with these parameters.
    pub fn new(params: Params) -> Self {
        Self {
            graph: params.graph(),
            params,
            keys: BTreeMap::new(),
            sharers: BTreeSet::new(),
            mailbox: BTreeMap::new(),
            sum: vec![0; params.len],
            masked: BTreeSet::new(),
            seeds: BTreeMap::new(),
            mask_keys: BTreeMap::new(),
            unmasked: BTreeSet::new(),
        }
    }

    fn unexpected(device: usize, reason: &str) -> SecAggError {
        SecAggError::Unexpected {
            device,
            reason: reason.into(),
        }
    }

    /// Step 1: a device's public keys.
    pub fn advertise(&mut self, id: usize, keys: AdvertiseKeys) -> Result<(), SecAggError> {
        if id >= self.params.devices || self.keys.contains_key(&id) {
            return Err(Self::unexpected(id, "no place for its keys"));
        }
        // A key of low order would make every neighbour's agreement with it fail, so one
        // device could make its neighbours drop out: refused here, before anyone sees it.
        if !usable_key(&keys.encryption) || !usable_key(&keys.masking) {
            return Err(SecAggError::BadKey(id));
        }
        self.keys.insert(id, keys);
        Ok(())
    }

    /// The keys of `id`'s neighbours that advertised, to send it for step 2.
    pub fn keys_for(&self, id: usize) -> BTreeMap<usize, AdvertiseKeys> {
        self.graph
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|j| self.keys.get(j).map(|k| (*j, *k)))
            .collect()
    }

    /// Step 2: a device's encrypted shares, one per neighbour that advertised.
    pub fn share(&mut self, id: usize, envelopes: Vec<Envelope>) -> Result<(), SecAggError> {
        if !self.keys.contains_key(&id) || self.sharers.contains(&id) {
            return Err(Self::unexpected(id, "no place for its shares"));
        }
        let expected: BTreeSet<usize> = self.keys_for(id).into_keys().collect();
        let got: BTreeSet<usize> = envelopes.iter().map(|e| e.to).collect();
        if got != expected || envelopes.iter().any(|e| e.from != id) {
            return Err(Self::unexpected(id, "its shares are not one per neighbour"));
        }
        for e in envelopes {
            self.mailbox.entry(e.to).or_default().push(e);
        }
        self.sharers.insert(id);
        Ok(())
    }

    /// The envelopes addressed to `id` from devices that shared, to send it for step 3.
    pub fn envelopes_for(&self, id: usize) -> Vec<Envelope> {
        self.mailbox
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|e| self.sharers.contains(&e.from))
            .cloned()
            .collect()
    }

    /// Step 3: a masked input, folded into the running sum at once.
    pub fn masked_input(&mut self, id: usize, y: &[u32]) -> Result<(), SecAggError> {
        if !self.sharers.contains(&id) || self.masked.contains(&id) {
            return Err(Self::unexpected(id, "no place for its masked input"));
        }
        if y.len() != self.params.len {
            return Err(SecAggError::Length {
                got: y.len(),
                expected: self.params.len,
            });
        }
        add_into(&mut self.sum, y, self.params.fixed_point.ring_mask());
        self.masked.insert(id);
        Ok(())
    }

    /// The devices whose masked inputs are in the sum, to send the survivors for step 4; an
    /// error when they are too few for the round.
    pub fn survivors(&self) -> Result<BTreeSet<usize>, SecAggError> {
        if self.masked.len() < self.params.min_survivors {
            return Err(SecAggError::TooFewSurvivors {
                have: self.masked.len(),
                need: self.params.min_survivors,
            });
        }
        Ok(self.masked.clone())
    }

    /// Step 4: a survivor's shares.
    pub fn unmask(&mut self, u: Unmasking) -> Result<(), SecAggError> {
        let from = u.from;
        if !self.masked.contains(&from) || self.unmasked.contains(&from) {
            return Err(Self::unexpected(from, "no place for its shares"));
        }
        let neighbours = &self.graph[from];
        for (owner, _) in u.seeds.iter().chain(&u.keys) {
            if !neighbours.contains(owner) {
                return Err(Self::unexpected(
                    from,
                    "a share of a device it is not next to",
                ));
            }
        }
        if u.seeds.iter().any(|(o, _)| !self.masked.contains(o))
            || u.keys.iter().any(|(o, _)| self.masked.contains(o))
        {
            return Err(Self::unexpected(
                from,
                "a share the survivors do not call for",
            ));
        }
        for (owner, share) in u.seeds {
            self.seeds.entry(owner).or_default().push(share);
        }
        for (owner, share) in u.keys {
            self.mask_keys.entry(owner).or_default().push(share);
        }
        self.unmasked.insert(from);
        Ok(())
    }

    /// The sum of the survivors' inputs (in the ring), with the number of survivors: each
    /// survivor's self mask and every dropped device's pairwise masks removed. An error when
    /// a secret cannot be rebuilt (too few shares came back): the round is abandoned.
    pub fn finish(mut self) -> Result<(Vec<u32>, usize), SecAggError> {
        let need = self.params.threshold;
        let mask = self.params.fixed_point.ring_mask();
        let len = self.params.len;
        let rebuild = |shares: Option<&Vec<Share>>, device: usize, what: &'static str| {
            let shares = shares.map_or(&[][..], Vec::as_slice);
            shamir::combine(shares, need).map_err(|_| SecAggError::Reconstruct {
                device,
                what,
                have: shares.len(),
                need,
            })
        };
        for &i in &self.masked {
            let seed = rebuild(self.seeds.get(&i), i, "self-mask seed")?;
            sub_from(&mut self.sum, &expand(&seed, len, mask), mask);
        }
        let dropped: Vec<usize> = self.sharers.difference(&self.masked).copied().collect();
        for j in dropped {
            let key = StaticSecret::from(rebuild(self.mask_keys.get(&j), j, "mask key")?);
            for &i in &self.graph[j] {
                if !self.masked.contains(&i) {
                    continue;
                }
                let shared = agree(&key, &self.keys[&i].masking, i)?;
                let seed = derive(&shared, b"pairwise-mask", self.params.round, i, j);
                let m = expand(&seed, len, mask);
                // Survivor i added +m if i < j, else -m: take it back out.
                if i < j {
                    sub_from(&mut self.sum, &m, mask);
                } else {
                    add_into(&mut self.sum, &m, mask);
                }
            }
        }
        Ok((self.sum, self.masked.len()))
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    /// RFC 7748's low-order points (u = 0, 1, and the order-8 points of section 6.1's
    /// check; p - 1 and p, p + 1 as non-canonical encodings) give no shared secret; a key
    /// drawn from a secret key always does.
    #[test]
    fn low_order_keys_are_unusable_and_drawn_keys_usable() {
        let from_hex = |h: &str| -> [u8; 32] {
            let mut k = [0u8; 32];
            for (i, b) in k.iter_mut().enumerate() {
                *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap();
            }
            k
        };
        let low_order = [
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0100000000000000000000000000000000000000000000000000000000000000",
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ];
        for h in low_order {
            assert!(!usable_key(&from_hex(h)), "{h}");
        }
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        for _ in 0..20 {
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let public = PublicKey::from(&StaticSecret::from(secret));
            assert!(usable_key(public.as_bytes()));
        }
        // The aggregator refuses such a key and keeps the device's place for a good one.
        let params = Params::new(1, 4, 3, FixedPoint::new(16, 4).unwrap(), 8, [7; 32]);
        let mut agg = Aggregator::new(params);
        let (_, good) = Client::new(0, params, &mut rng);
        let bad = AdvertiseKeys {
            masking: [0; 32],
            ..good
        };
        assert_eq!(agg.advertise(0, bad), Err(SecAggError::BadKey(0)));
        agg.advertise(0, good).unwrap();
    }
}
