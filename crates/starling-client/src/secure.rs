//! The device's side of a secure round (`[tasks.secure_aggregation]`): the core's SecAgg+
//! [`Client`] over the [`Transport`]. After training, the device advertises its keys, sends
//! its neighbours encrypted shares of its secrets, sends its update (weighted by its capped
//! example count, clipped, with its loss and accuracy as extra values, in fixed point)
//! masked, and helps unmask the survivors' sum. The update itself never leaves the device;
//! every secret comes from an operating-system-seeded CSPRNG and lives only for the round.
//!
//! The device builds the round's public parameters itself from the assignment
//! (`Params::new`), so the server chooses neither the neighbourhood degree nor the threshold.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use rand::SeedableRng;
use starling_core::secagg::input::InputSpec;
use starling_core::secagg::protocol::{Client, Params, SecAggError};
use starling_core::wire::params::Layout;
use starling_core::wire::protocol::{
    SecureAssignment, SecureEnvelope, SecureEnvelopes, SecureKeys, SecureUnmasking,
};
use starling_core::wire::update;

use crate::transport::{SecureCall, SecureReply, Transport};
use crate::ClientError;

fn protocol(what: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(format!("secure round: {what}"))
}

fn secagg(e: SecAggError) -> ClientError {
    protocol(e)
}

/// The round's public parameters and the input encoding, from the assignment (the core's
/// [`round_params`](starling_core::secagg::input::round_params)).
pub fn round_params(
    round: u64,
    a: &SecureAssignment,
    layout: &Layout,
) -> Result<(Params, InputSpec), ClientError> {
    starling_core::secagg::input::round_params(round, a, layout.numel()).map_err(protocol)
}

/// Tries of one call that fails in a way worth repeating (unreachable, 5xx, 429).
const TRIES: u32 = 20;

/// One call, repeated after a pause while it fails in a way worth repeating (the server's
/// `Retry-After`, or a second). A message the server answers `duplicate_message` to on a
/// repeat was taken by an earlier try (only this device holds the token).
async fn send<T: Transport>(
    transport: &T,
    url: &str,
    token: &str,
    call: SecureCall,
) -> Result<SecureReply, ClientError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match transport.secure(url, token, call.clone()).await {
            Err(e) if e.is_retryable() && tries < TRIES => {
                let wait = e
                    .retry_after()
                    .unwrap_or(std::time::Duration::from_secs(1))
                    .min(std::time::Duration::from_secs(30));
                tokio::time::sleep(wait).await;
            }
            Err(e) if tries > 1 && e.code() == Some(crate::ErrorCode::DuplicateMessage) => {
                return Ok(SecureReply::Accepted)
            }
            other => return other,
        }
    }
}

/// Asks until the answer is ready, waiting as the server says.
async fn poll<T: Transport>(
    transport: &T,
    url: &str,
    token: &str,
    call: SecureCall,
) -> Result<SecureReply, ClientError> {
    loop {
        match send(transport, url, token, call.clone()).await? {
            SecureReply::Wait(after) => tokio::time::sleep(after).await,
            reply => return Ok(reply),
        }
    }
}

/// Takes part in a secure round with an encoded update (`train::local_update`'s output)
/// through its four steps. `Ok` once the device's unmasking shares are in; a refusal (the
/// round closed, or moved on without this device) is the transport's error.
pub async fn contribute<T: Transport>(
    transport: &T,
    round: u64,
    token: &str,
    assignment: &SecureAssignment,
    layout: &Layout,
    update_body: &[u8],
) -> Result<(), ClientError> {
    let (params, spec) = round_params(round, assignment, layout)?;
    let url = assignment.secure_url.as_str();
    let index = usize::try_from(assignment.index).map_err(protocol)?;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    // The input first, so that nothing fails after the keys are out.
    let view = update::decode(update_body, layout, None).map_err(protocol)?;
    let x = spec.encode_update(&params.fixed_point, &view, &mut rng);
    drop(view);

    // Step 1: advertise keys.
    let (mut client, keys) = Client::new(index, params, &mut rng);
    send(
        transport,
        url,
        token,
        SecureCall::PostKeys(SecureKeys::from(&keys)),
    )
    .await?;

    // Step 2: share keys with the neighbours that advertised.
    let SecureReply::Keys(neighbours) = poll(transport, url, token, SecureCall::GetKeys).await?
    else {
        return Err(protocol("expected the neighbours' keys"));
    };
    let mut peers = BTreeMap::new();
    for (i, k) in neighbours.keys {
        peers.insert(
            usize::try_from(i).map_err(protocol)?,
            k.decode()
                .map_err(|e| protocol(format!("a neighbour's key: {e}")))?,
        );
    }
    let envelopes = client.share_keys(&peers, &mut rng).map_err(secagg)?;
    send(
        transport,
        url,
        token,
        SecureCall::PostShares(SecureEnvelopes {
            envelopes: envelopes.iter().map(SecureEnvelope::from).collect(),
        }),
    )
    .await?;

    // Step 3: the masked input.
    let SecureReply::Envelopes(mine) = poll(transport, url, token, SecureCall::GetShares).await?
    else {
        return Err(protocol("expected the envelopes"));
    };
    let mine = mine
        .envelopes
        .iter()
        .map(|e| e.decode().map_err(protocol))
        .collect::<Result<Vec<_>, ClientError>>()?;
    let y = client.masked_input(&mine, &x).map_err(secagg)?;
    let body: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    send(
        transport,
        url,
        token,
        SecureCall::PostInput(Bytes::from(body)),
    )
    .await?;

    // Step 4: unmask.
    let SecureReply::Survivors(survivors) =
        poll(transport, url, token, SecureCall::GetSurvivors).await?
    else {
        return Err(protocol("expected the survivors"));
    };
    let survivors: BTreeSet<usize> = survivors
        .survivors
        .into_iter()
        .map(|i| usize::try_from(i).map_err(protocol))
        .collect::<Result<_, _>>()?;
    let u = client.unmask(&survivors).map_err(secagg)?;
    send(
        transport,
        url,
        token,
        SecureCall::PostUnmask(SecureUnmasking::from(&u)),
    )
    .await?;
    Ok(())
}
