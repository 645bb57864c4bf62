//! The agent's decisions, without I/O: whether to take a round, whether a round was
//! already released, which tensors of the global model to fetch, and how to assemble the
//! model from cache and download.
//!
//! Nothing the coordinator sends can override the site's own limits: a plan without
//! differential privacy when the site requires it, or one that would take the site past
//! its budget (epsilon at its delta, or its number of rounds), is declined here. The
//! budget is checked against an [`Accountant`] rebuilt from the site's own ledger.

use std::sync::Arc;

use fedward_shared::config::SiteBudget;
use fedward_shared::dp::{Accountant, Budget, BudgetError, Release, ScoreRelease};
use fedward_shared::ledger::{Body, Ledger, ReleaseRecord};
use fedward_shared::plan::PrivacyPlan;
use fedward_shared::secagg::{FixedPoint, RoundSetup};
use fedward_shared::tensor::{manifest_digest, Digest, TensorSet, TensorSpec};
use fedward_shared::wire::{AcceptedUpdate, DeclineReason, RoundId, RoundOffer, SiteId};

/// What to do with an offer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Train, then release under this spend.
    Train(Approved),
    Decline {
        reason: DeclineReason,
        message: String,
    },
}

/// A round the site's rules allow, and what releasing it will cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Approved {
    /// What the accountant will record (the plan's mechanism and step count).
    pub release: Release,
    /// Cumulative epsilon at the budget's delta before and after this round (infinite for
    /// a site that ever released without DP).
    pub epsilon_before: f64,
    pub epsilon_after: f64,
}

fn decline(reason: DeclineReason, message: impl Into<String>) -> Decision {
    Decision::Decline { reason, message: message.into() }
}

/// Reviews an offer against the site's own rules. `spent` is the accountant of every
/// release in the site's ledger; `can_score` says whether the site has a validation split
/// to score the offered model with, when the offer asks (model selection: the score is
/// part of the release, [`with_score`]).
///
/// A DP plan is allowed exactly when the epsilon after the round is at most
/// `max_epsilon` at the site's `delta` ([`Budget::check`]) and the round count stays within
/// `max_rounds`. A plan without DP is allowed only where the site opted in
/// (`require_dp = false`), and still counts against `max_rounds`; after it the site's
/// epsilon is unbounded, so every later DP round is declined.
pub fn review_offer(offer: &RoundOffer, budget: &SiteBudget, spent: &Accountant, can_score: bool) -> Decision {
    let plan = &offer.plan;
    if budget.require_dp && plan.privacy == PrivacyPlan::Off {
        return decline(
            DeclineReason::PlanUnacceptable,
            "the plan has no differential privacy and this site requires it (budget.require_dp)",
        );
    }
    if let Some(problem) = clip_problem(&plan.privacy) {
        return decline(DeclineReason::PlanUnacceptable, problem);
    }
    let release = match planned_release(offer).and_then(|r| with_score(offer, can_score, r)) {
        Ok(r) => r,
        Err(message) => return decline(DeclineReason::PlanUnacceptable, message),
    };
    let site_budget = match Budget::new(budget.max_epsilon, budget.delta, budget.max_rounds) {
        Ok(b) => b,
        Err(e) => return decline(DeclineReason::BudgetExhausted, e.to_string()),
    };
    let approved = if release.mode == fedward_shared::plan::PrivacyMode::Off {
        // No epsilon to check (it is infinite): only the round limit applies.
        if let Some(max) = budget.max_rounds {
            if spent.releases() >= max {
                return decline(DeclineReason::BudgetExhausted, BudgetError::RoundsExhausted { max_rounds: max }.to_string());
            }
        }
        let epsilon_before = match spent.epsilon(budget.delta) {
            Ok(e) => e,
            Err(e) => return decline(DeclineReason::PlanUnacceptable, e.to_string()),
        };
        Approved { release, epsilon_before, epsilon_after: f64::INFINITY }
    } else {
        match site_budget.check(spent, &release) {
            Ok(spend) => Approved { release, epsilon_before: spend.epsilon_before, epsilon_after: spend.epsilon_after },
            Err(e @ (BudgetError::Exceeded { .. } | BudgetError::RoundsExhausted { .. } | BudgetError::Invalid(_))) => {
                return decline(DeclineReason::BudgetExhausted, e.to_string())
            }
            // A mechanism this site's ledger cannot compose with (record-level after
            // site-level rounds, say): the plan, not the budget, is the problem.
            Err(BudgetError::Dp(e)) => return decline(DeclineReason::PlanUnacceptable, e.to_string()),
        }
    };
    if plan.trainable_tensors.is_empty() {
        return decline(DeclineReason::PlanUnacceptable, "the plan trains no tensor");
    }
    if let Some(missing) = plan.trainable_tensors.iter().find(|n| !offer.manifest.iter().any(|s| &s.name == *n)) {
        return decline(DeclineReason::ModelMismatch, format!("trainable tensor {missing} is not in the offered model"));
    }
    if manifest_digest(&offer.manifest) != offer.model_digest {
        return decline(DeclineReason::ModelMismatch, "the offered manifest does not match the offered model digest");
    }
    Decision::Train(approved)
}

/// The release one round of `offer` makes, for the budget check: the plan's; under
/// distributed DP the noise share the secure round implies
/// ([`fedward_shared::wire::SecureRound::distributed_release`]), whose epsilon is the
/// distributed accountant's. A distributed plan offered without secure aggregation is
/// refused: the coordinator would see this site's share of the noise alone.
pub fn planned_release(offer: &RoundOffer) -> Result<Release, String> {
    let plan = &offer.plan;
    let PrivacyPlan::Distributed { noise_multiplier, .. } = plan.privacy else {
        return Release::planned(&plan.privacy, plan.local_epochs).map_err(|e| format!("invalid privacy plan: {e}"));
    };
    let Some(secure) = &offer.secure else {
        return Err("distributed DP offered without secure aggregation: the coordinator would see this site's noise share alone".into());
    };
    let share = secure
        .distributed_release(&plan.privacy)
        .map_err(|e| format!("invalid privacy plan: {e}"))?
        .ok_or_else(|| "invalid privacy plan: no distributed noise share".to_string())?;
    let release = Release::distributed(noise_multiplier, share);
    release.validate().map_err(|e| format!("invalid privacy plan: {e}"))?;
    Ok(release)
}

/// The round's release with the score the offer asks for (model selection), when the
/// site can score: noised with the offer's multiplier under a DP plan, exact without one;
/// alone (no update counted) in the final scoring round, which a site without a
/// validation split declines. No score is released in a secure round, where it would be
/// the only thing in the clear.
pub fn with_score(offer: &RoundOffer, can_score: bool, release: Release) -> Result<Release, String> {
    let Some(scoring) = offer.scoring else { return Ok(release) };
    if offer.secure.is_some() {
        return Err("the offer asks for a score of the model in a secure round, where it would leave in the clear".into());
    }
    if !can_score {
        if scoring.only {
            return Err("this round only scores the last model, and the site has no validation split".into());
        }
        return Ok(release);
    }
    let noise_multiplier = if release.mode == fedward_shared::plan::PrivacyMode::Off { 0.0 } else { scoring.noise_multiplier };
    let release = release.with_score(Some(ScoreRelease { noise_multiplier, alone: scoring.only }));
    release.validate().map_err(|e| format!("invalid score release: {e}"))?;
    Ok(release)
}

/// Clipping norms must be finite and positive, or the noise scale means nothing.
fn clip_problem(plan: &PrivacyPlan) -> Option<String> {
    let bad =
        |name: &str, v: f64| (!(v.is_finite() && v > 0.0)).then(|| format!("invalid privacy plan: {name} {v} is not a finite number > 0"));
    match *plan {
        PrivacyPlan::Off => None,
        PrivacyPlan::SiteLevel { clip_norm, .. } | PrivacyPlan::Distributed { clip_norm, .. } => bad("clip norm", clip_norm),
        PrivacyPlan::RecordLevel { clip_norm, update_clip_norm, .. } => {
            bad("clip norm", clip_norm).or_else(|| bad("update clip norm", update_clip_norm))
        }
    }
}

/// What a site takes part in a secure round under, from its offer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SecureTerms {
    /// The round's setup: used for one `SecAggClient` only, never again.
    pub setup: RoundSetup,
    /// The fixed-point encoding of the update.
    pub fixed: FixedPoint,
    /// The L2 bound the site clips its (private) update to before encoding it.
    pub clip: f32,
    /// How long each short step may take.
    pub step_deadline: std::time::Duration,
}

/// Reviews an offer's secure aggregation: `Ok(None)` for a round in the clear; the terms
/// when the site can honour them (`can_secure`: it holds its certificate's key and the
/// CA to check the other sites' keys with) and the offer is consistent with itself
/// ([`fedward_shared::wire::SecureRound::check`]); else why it is declined (the plan is
/// unacceptable).
pub fn review_secure(offer: &RoundOffer, can_secure: bool) -> Result<Option<SecureTerms>, String> {
    let Some(secure) = &offer.secure else { return Ok(None) };
    if !can_secure {
        return Err("the round is secure and this agent has no secure aggregation identity".into());
    }
    let fixed = secure.check(offer).map_err(|e| format!("the secure round cannot be honoured: {e}"))?;
    Ok(Some(SecureTerms {
        setup: secure.setup,
        fixed,
        clip: secure.clip,
        step_deadline: std::time::Duration::from_secs(secure.step_deadline_secs.clamp(1, 3600)),
    }))
}

/// The update as a secure round sums it: the offer's trainable tensors in the offer's
/// order, flattened, scaled down to L2 norm `clip` when above it (an honest site's
/// update never exceeds the bound the coordinator can no longer enforce).
pub fn secure_input(offer: &RoundOffer, delta: &TensorSet, clip: f32) -> Result<Vec<f32>, String> {
    let mut out = Vec::new();
    for spec in offer.trainable_specs() {
        let t = delta.get(&spec.name).ok_or_else(|| format!("the update lacks tensor {}", spec.name))?;
        if t.shape() != spec.shape.as_slice() {
            return Err(format!("update shape mismatch for {}: expected {:?}, got {:?}", spec.name, spec.shape, t.shape()));
        }
        out.extend_from_slice(t.data());
    }
    let norm = out.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    if !norm.is_finite() {
        return Err("the update holds a non-finite value".into());
    }
    if norm > f64::from(clip) {
        let scale = f64::from(clip) / norm;
        for v in &mut out {
            *v = (f64::from(*v) * scale) as f32;
        }
    }
    Ok(out)
}

/// The update the agent recorded and cached last: enough to recognise its round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedRelease {
    pub round: RoundId,
    /// The global model it was trained from.
    pub model_digest: Digest,
    /// [`TensorSet::digest`] of the update.
    pub update_digest: Digest,
}

/// What the ledger and the cached update say about an offered round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prior {
    /// Nothing released for this round and model: review, train and release.
    Fresh,
    /// The ledger's last release is this round, from this model, and the cached update is
    /// the one it records: send that again, without training or spending.
    Resend,
    /// The ledger records a release for this round but the cached update is gone or is
    /// another one: the agent cannot resend it and must not release the round twice.
    Unrecoverable,
}

/// Whether `offer` was already released: the crash-between-record-and-send case. A release
/// for the same round from another global model means the round moved on (the
/// coordinator restarted from an earlier checkpoint, say): train again; the first spend
/// stays counted, so the ledger can over-count but never under-count.
pub fn prior_release(offer: &RoundOffer, last: Option<&ReleaseRecord>, cached: Option<&CachedRelease>) -> Prior {
    let Some(last) = last.filter(|r| r.round == offer.round) else { return Prior::Fresh };
    match cached {
        Some(c) if c.round == offer.round && c.update_digest == last.update_digest => {
            if c.model_digest == offer.model_digest {
                Prior::Resend
            } else {
                Prior::Fresh
            }
        }
        _ => Prior::Unrecoverable,
    }
}

/// How long before its certificate expires a site is warned, at every (re)connection, at
/// most: a short-lived certificate is warned about in its last quarter instead, after the
/// renewal at its last third ([`renewal_due`]) should have replaced it.
pub const CERTIFICATE_WARNING: time::Duration = time::Duration::days(14);

/// The warning a site whose certificate (valid `not_before` to `not_after`) runs out
/// soon logs, loudly: when it lapses the coordinator closes the connection and refuses it.
pub fn certificate_warning(now: time::OffsetDateTime, not_before: time::OffsetDateTime, not_after: time::OffsetDateTime) -> Option<String> {
    let left = not_after - now;
    let threshold = CERTIFICATE_WARNING.min((not_after - not_before) / 4);
    if left <= time::Duration::ZERO {
        Some(format!("this site's certificate expired at {not_after}: the coordinator will refuse it; renew it (fedward-agent pki request, then the admin's pki sign)"))
    } else if left <= threshold {
        Some(format!(
            "this site's certificate expires in {} ({not_after}) and was not renewed automatically: check the agent's log for the \
             renewal's failure, or renew it by hand (fedward-agent pki request, then the admin's pki sign); at expiry the coordinator \
             closes the connection and refuses it",
            humantime::format_duration(std::time::Duration::from_secs(left.whole_seconds().max(0) as u64))
        ))
    } else {
        None
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed: once two thirds
/// of its life are over (kubelet rotates at 70-90%), so a renewal that fails has a third
/// of the lifetime to be retried and noticed.
pub fn renewal_due(not_before: time::OffsetDateTime, not_after: time::OffsetDateTime) -> time::OffsetDateTime {
    not_after - (not_after - not_before) / 3
}

/// A coordinator that greets this agent as another site than its certificate names is not
/// one to train for: either it is misconfigured or it is not the consortium's coordinator.
/// Nothing is recorded under a name the coordinator chose.
pub fn check_welcome_site(own: &SiteId, welcomed_as: &SiteId) -> Result<(), String> {
    if own == welcomed_as {
        Ok(())
    } else {
        Err(format!(
            "the coordinator admitted this agent as site {welcomed_as:?}, but its certificate names {own:?}: check the coordinator's \
             enrolment and that this is the consortium's coordinator"
        ))
    }
}

/// The updates the coordinator lists as accepted from this site (its `Welcome`) that the
/// site's ledger does not hold as releases. Every accepted update was recorded before it
/// was sent, so any here means the ledger lost releases.
pub fn unrecorded_acceptances(ledger: &Ledger, accepted: &[AcceptedUpdate]) -> Vec<AcceptedUpdate> {
    let recorded: std::collections::BTreeSet<(RoundId, Digest)> = ledger
        .entries()
        .iter()
        .filter_map(|e| match &e.body {
            Body::Release(r) => Some((r.round, r.update_digest)),
            _ => None,
        })
        .collect();
    accepted.iter().copied().filter(|a| !recorded.contains(&(a.round, a.update_digest))).collect()
}

/// Whether a round left with `left_secs` before its deadline can be trained in time,
/// judged by how long the site's last round took (with a quarter to spare): training one
/// the coordinator will not wait for spends privacy for nothing. Without a last round to
/// go by, the site tries.
pub fn fits_deadline(last_train_secs: Option<f64>, left_secs: f64) -> Result<(), String> {
    match last_train_secs {
        Some(last) if last * 1.25 > left_secs => Err(format!(
            "the last round took {last:.0} s to train and {left_secs:.0} s are left before the deadline; declining rather than \
             spending privacy on an update the coordinator will not wait for"
        )),
        _ => Ok(()),
    }
}

/// The global model the agent holds, with the digests it was verified against: each
/// tensor is hashed once, when it arrives (or when the cache is read at start-up), and
/// never again while it stays unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedModel {
    /// Shared with the trainer and the background write of the cache file.
    pub set: Arc<TensorSet>,
    /// Name, shape and digest of every tensor, in name order.
    pub specs: Vec<TensorSpec>,
    /// The whole model's digest (`manifest_digest(&specs)`).
    pub digest: Digest,
}

impl CachedModel {
    /// Hashes `set` (a model read from disk).
    pub fn new(set: TensorSet) -> Self {
        let specs = set.specs();
        Self { digest: manifest_digest(&specs), specs, set: Arc::new(set) }
    }
}

/// The tensors of `manifest` that `cache` lacks or holds with another digest (no hashing:
/// the cache knows its digests).
pub fn tensors_to_fetch(manifest: &[TensorSpec], cache: Option<&CachedModel>) -> Vec<String> {
    manifest
        .iter()
        .filter(|spec| cache.and_then(|c| c.specs.iter().find(|s| s.name == spec.name)).is_none_or(|s| s != *spec))
        .map(|spec| spec.name.clone())
        .collect()
}

/// Why the global model could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("tensor {0} of the offered model was neither cached nor received")]
    Missing(String),
    #[error("the offered manifest digests to {actual}, the offer announced {expected}")]
    Digest { expected: Digest, actual: Digest },
    #[error("the offered manifest is not in name order, each name once")]
    Order,
    #[error("tensor {name} arrived shaped {got:?}; the offer says {offered:?}")]
    Shape { name: String, offered: Vec<usize>, got: Vec<usize> },
}

/// Checks a `Tensors` reply against the request and the offer before anything is
/// allocated: exactly the requested names, in order, each with the shape and digest the
/// offer's manifest gave it.
pub fn check_tensors_reply(manifest: &[TensorSpec], requested: &[String], reply: &[TensorSpec]) -> Result<(), String> {
    if reply.len() != requested.len() {
        return Err(format!("the coordinator sent {} tensors for {} requested", reply.len(), requested.len()));
    }
    for (spec, name) in reply.iter().zip(requested) {
        if &spec.name != name {
            return Err(format!("the coordinator sent tensor {} where {name} was requested", spec.name));
        }
        match manifest.iter().find(|m| m.name == spec.name) {
            Some(offered) if offered == spec => {}
            Some(offered) => {
                return Err(format!(
                    "the coordinator sent {} as {:?} (digest {}), but offered it as {:?} (digest {})",
                    spec.name,
                    spec.shape,
                    spec.digest.short(),
                    offered.shape,
                    offered.digest.short()
                ))
            }
            None => return Err(format!("the coordinator sent tensor {}, which its offer does not list", spec.name)),
        }
    }
    Ok(())
}

/// Builds the offered model from `fetched` (each tensor's digest already checked against
/// the manifest as it arrived: `wire::finish_tensor`) and the cache's unchanged tensors
/// (verified when they arrived). The manifest must be the offered model's: in name order,
/// each name once, and digesting to `expected`. Nothing is hashed again.
pub fn assemble(
    manifest: &[TensorSpec],
    expected: Digest,
    cache: Option<CachedModel>,
    mut fetched: TensorSet,
) -> Result<CachedModel, AssembleError> {
    let actual = manifest_digest(manifest);
    if actual != expected {
        return Err(AssembleError::Digest { expected, actual });
    }
    if manifest.windows(2).any(|w| w[0].name >= w[1].name) {
        return Err(AssembleError::Order);
    }
    let (mut cached, cached_specs) = match cache {
        // The previous round's trainer and cache write have let go of it by now; if not,
        // a copy.
        Some(c) => (Arc::try_unwrap(c.set).unwrap_or_else(|shared| (*shared).clone()), c.specs),
        None => (TensorSet::new(), Vec::new()),
    };
    let mut model = TensorSet::new();
    for spec in manifest {
        let t = match fetched.remove(&spec.name) {
            Some(t) if t.shape() == spec.shape.as_slice() => t,
            Some(t) => return Err(AssembleError::Shape { name: spec.name.clone(), offered: spec.shape.clone(), got: t.shape().to_vec() }),
            None => cached
                .remove(&spec.name)
                .filter(|_| cached_specs.iter().any(|s| s == spec))
                .ok_or_else(|| AssembleError::Missing(spec.name.clone()))?,
        };
        model.insert(spec.name.clone(), t);
    }
    Ok(CachedModel { set: Arc::new(model), specs: manifest.to_vec(), digest: expected })
}

#[cfg(test)]
mod tests {
    use fedward_shared::plan::PrivacyMode;
    use fedward_shared::plan::{Trainable, TrainingPlan};
    use fedward_shared::tensor::Tensor;
    use fedward_shared::wire::{PrivacyPolicy, RoundId};

    use super::*;

    fn model(v: f32) -> TensorSet {
        let mut m = TensorSet::new();
        m.insert("bert.embeddings.word_embeddings.weight", Tensor::new(vec![2], vec![0.5, 0.5]).unwrap());
        m.insert("classifier.weight", Tensor::new(vec![2], vec![v, v]).unwrap());
        m
    }

    fn offer(privacy: PrivacyPlan) -> RoundOffer {
        let m = model(1.0);
        RoundOffer {
            scoring: None,
            round: RoundId(1),
            model_digest: m.digest(),
            manifest: m.specs(),
            plan: TrainingPlan { seed: 0, privacy, ..TrainingPlan::minimal(Trainable::Head, vec!["classifier.weight".into()]) },
            policy: PrivacyPolicy { mode: PrivacyMode::Off, min_noise_multiplier: 0.0, max_clip_norm: 1.0 },
            deadline_secs: 60,
            total_rounds: 3,
            update_encoding: fedward_shared::codec::UpdateEncoding::F32,
            secure: None,
        }
    }

    #[test]
    fn a_secure_offer_is_taken_only_when_it_can_be_honoured() {
        use fedward_shared::secagg::SecAggParams;
        use fedward_shared::wire::SecureRound;
        let mut o = offer(PrivacyPlan::Off);
        assert_eq!(review_secure(&o, false), Ok(None), "a round in the clear needs nothing");
        let params = SecAggParams { threshold: 2, min_sites: 2, neighbours: 2, modulus_bits: 48 };
        let context = SecureRound::context(o.round, 1, &o.model_digest, 1.0, 100, 3);
        o.secure = Some(SecureRound {
            setup: RoundSetup::new(o.round, params, 3).unwrap().with_context(context),
            attempt: 1,
            clip: 1.0,
            max_weight: 100,
            max_sites: 3,
            step_deadline_secs: 30,
        });
        let terms = review_secure(&o, true).unwrap().unwrap();
        assert_eq!((terms.clip, terms.step_deadline.as_secs()), (1.0, 30));
        assert!(review_secure(&o, false).unwrap_err().contains("no secure aggregation identity"));
        // A context that is not this offer's (another model, say) is refused.
        let mut other = o.clone();
        other.model_digest = Digest([9; 32]);
        assert!(review_secure(&other, true).unwrap_err().contains("context"));
        // The input: the trainable tensor flattened, clipped to the bound.
        let mut delta = TensorSet::new();
        delta.insert("classifier.weight", Tensor::new(vec![2], vec![3.0, 4.0]).unwrap());
        let x = secure_input(&o, &delta, terms.clip).unwrap();
        assert!((x[0] - 0.6).abs() < 1e-6 && (x[1] - 0.8).abs() < 1e-6, "{x:?}");
        assert!(secure_input(&o, &TensorSet::new(), 1.0).unwrap_err().contains("lacks"));
    }

    fn budget(require_dp: bool, max_rounds: Option<u64>) -> SiteBudget {
        SiteBudget { max_epsilon: 8.0, delta: 1e-5, max_rounds, require_dp, share_metrics: false }
    }

    fn spent(releases: &[Release]) -> Accountant {
        let mut acc = Accountant::new();
        for r in releases {
            acc.record(r).unwrap();
        }
        acc
    }

    fn approved(d: &Decision) -> Approved {
        match d {
            Decision::Train(a) => *a,
            other => panic!("expected to train, got {other:?}"),
        }
    }

    fn declined(d: &Decision) -> DeclineReason {
        match d {
            Decision::Decline { reason, .. } => *reason,
            other => panic!("expected a decline, got {other:?}"),
        }
    }

    const SITE: PrivacyPlan = PrivacyPlan::SiteLevel { noise_multiplier: 4.0, clip_norm: 1.0 };
    const RECORD: PrivacyPlan =
        PrivacyPlan::RecordLevel { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.05, update_clip_norm: 5.0 };

    /// A coordinator may lie in its `Tensors` reply: a shape other than offered (a huge
    /// allocation), a tensor not requested, or one sent twice, all refused before any
    /// allocation.
    #[test]
    fn a_tensors_reply_must_match_the_request_and_the_offer() {
        let o = offer(PrivacyPlan::Off);
        let names = vec!["classifier.weight".to_owned()];
        let asked: Vec<TensorSpec> = o.manifest.iter().filter(|s| s.name == names[0]).cloned().collect();
        assert_eq!(check_tensors_reply(&o.manifest, &names, &asked), Ok(()));
        let mut huge = asked.clone();
        huge[0].shape = vec![1 << 28];
        assert!(check_tensors_reply(&o.manifest, &names, &huge).unwrap_err().contains("offered it as [2]"));
        let mut other_digest = asked.clone();
        other_digest[0].digest = Digest([9; 32]);
        assert!(check_tensors_reply(&o.manifest, &names, &other_digest).is_err());
        let twice = [asked.clone(), asked.clone()].concat();
        assert!(check_tensors_reply(&o.manifest, &names, &twice).is_err());
        let mut unlisted = asked.clone();
        unlisted[0].name = "bert.pooler.dense.weight".into();
        assert!(check_tensors_reply(&o.manifest, &["bert.pooler.dense.weight".to_owned()], &unlisted)
            .unwrap_err()
            .contains("does not list"));
        assert!(check_tensors_reply(&o.manifest, &names, &[]).is_err());
    }

    #[test]
    fn a_round_that_cannot_be_trained_in_time_is_declined() {
        assert!(fits_deadline(None, 1.0).is_ok(), "the first round is tried");
        assert!(fits_deadline(Some(100.0), 600.0).is_ok());
        let err = fits_deadline(Some(100.0), 110.0).unwrap_err();
        assert!(err.contains("100 s to train") && err.contains("110 s are left"), "{err}");
    }

    /// Model selection: the score the offer asks for is part of the release the budget
    /// checks (noised under a DP plan, exact without); a site without a validation split
    /// trains without scoring, and declines the round that only scores.
    #[test]
    fn a_score_asked_for_is_counted_in_the_budget_check() {
        use fedward_shared::wire::Scoring;
        let scoring = |only| Some(Scoring { noise_multiplier: 10.0, only });
        let mut o = offer(SITE);
        o.scoring = scoring(false);
        let plain = approved(&review_offer(&offer(SITE), &budget(true, None), &Accountant::new(), true));
        let a = approved(&review_offer(&o, &budget(true, None), &Accountant::new(), true));
        assert_eq!(a.release.score, Some(ScoreRelease { noise_multiplier: 10.0, alone: false }));
        assert!(a.epsilon_after > plain.epsilon_after, "the score costs privacy: {} vs {}", a.epsilon_after, plain.epsilon_after);
        let unscored = approved(&review_offer(&o, &budget(true, None), &Accountant::new(), false));
        assert_eq!(unscored.release, plain.release, "no validation split: no score, no cost");
        o.scoring = scoring(true);
        let alone = approved(&review_offer(&o, &budget(true, None), &Accountant::new(), true));
        assert_eq!(alone.release.score, Some(ScoreRelease { noise_multiplier: 10.0, alone: true }));
        assert!(alone.epsilon_after < plain.epsilon_after, "only the score: {}", alone.epsilon_after);
        assert_eq!(declined(&review_offer(&o, &budget(true, None), &Accountant::new(), false)), DeclineReason::PlanUnacceptable);
        // Without DP the score is exact.
        let mut off = offer(PrivacyPlan::Off);
        off.scoring = scoring(false);
        let a = approved(&review_offer(&off, &budget(false, None), &Accountant::new(), true));
        assert_eq!(a.release.score, Some(ScoreRelease { noise_multiplier: 0.0, alone: false }));
    }

    #[test]
    fn a_site_that_requires_dp_declines_a_plan_without_it() {
        let d = review_offer(&offer(PrivacyPlan::Off), &budget(true, None), &Accountant::new(), false);
        assert_eq!(declined(&d), DeclineReason::PlanUnacceptable);
        let a = approved(&review_offer(&offer(PrivacyPlan::Off), &budget(false, None), &Accountant::new(), false));
        assert_eq!(a.release, Release::off());
        assert_eq!((a.epsilon_before, a.epsilon_after), (0.0, f64::INFINITY));
    }

    #[test]
    fn dp_plans_are_approved_with_the_spend_they_imply() {
        let a = approved(&review_offer(&offer(SITE), &budget(true, None), &Accountant::new(), false));
        assert_eq!(a.release, Release::site_level(4.0));
        assert_eq!(a.epsilon_before, 0.0);
        assert_eq!(a.epsilon_after, Accountant::new().epsilon_after(&Release::site_level(4.0), 1e-5).unwrap());
        // Record-level: round(local_epochs / q) = 20 steps.
        let a = approved(&review_offer(&offer(RECORD), &budget(true, None), &Accountant::new(), false));
        assert_eq!(a.release, Release::record_level(1.0, 0.05, 20));
        assert!(a.epsilon_after > 0.0 && a.epsilon_after <= 8.0, "{a:?}");
    }

    /// The budget holds exactly at its boundary: a round reaching `max_epsilon` is taken,
    /// one that would pass it by a single ulp is declined, whatever the coordinator offers.
    #[test]
    fn budget_refusal_is_exact_at_the_boundary() {
        for plan in [SITE, RECORD] {
            let release = Release::planned(&plan, 1).unwrap();
            let acc = spent(&[release, release]);
            let after_three = acc.epsilon_after(&release, 1e-5).unwrap();
            let at = SiteBudget { max_epsilon: after_three, delta: 1e-5, max_rounds: None, require_dp: true, share_metrics: false };
            let a = approved(&review_offer(&offer(plan), &at, &acc, false));
            assert_eq!(a.epsilon_after, after_three);
            assert_eq!(a.epsilon_before, acc.epsilon(1e-5).unwrap());
            let below = SiteBudget { max_epsilon: f64::from_bits(after_three.to_bits() - 1), ..at };
            let d = review_offer(&offer(plan), &below, &acc, false);
            assert_eq!(declined(&d), DeclineReason::BudgetExhausted, "{}", plan.mode_name());
            let Decision::Decline { message, .. } = d else { unreachable!() };
            assert!(message.contains("above the budget"), "{message}");
        }
    }

    #[test]
    fn max_rounds_is_a_hard_limit_with_and_without_dp() {
        for plan in [PrivacyPlan::Off, SITE] {
            let release = Release::planned(&plan, 1).unwrap();
            let b = SiteBudget { max_epsilon: 1e6, ..budget(false, Some(2)) };
            approved(&review_offer(&offer(plan), &b, &spent(&[release]), false));
            let d = review_offer(&offer(plan), &b, &spent(&[release, release]), false);
            assert_eq!(declined(&d), DeclineReason::BudgetExhausted, "{}", plan.mode_name());
        }
    }

    /// A site that once released without DP has no finite epsilon left; a site-level
    /// ledger cannot take a record-level round.
    #[test]
    fn earlier_releases_constrain_later_plans() {
        let after_off = spent(&[Release::off()]);
        assert_eq!(declined(&review_offer(&offer(SITE), &budget(false, None), &after_off, false)), DeclineReason::BudgetExhausted);
        let after_site = spent(&[Release::site_level(4.0)]);
        assert_eq!(declined(&review_offer(&offer(RECORD), &budget(true, None), &after_site, false)), DeclineReason::PlanUnacceptable);
    }

    #[test]
    fn invalid_privacy_parameters_are_declined() {
        for plan in [
            PrivacyPlan::SiteLevel { noise_multiplier: 0.0, clip_norm: 1.0 },
            PrivacyPlan::SiteLevel { noise_multiplier: 1.0, clip_norm: f64::INFINITY },
            PrivacyPlan::RecordLevel { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.0, update_clip_norm: 1.0 },
            PrivacyPlan::RecordLevel { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.5, update_clip_norm: -1.0 },
            PrivacyPlan::RecordLevel { noise_multiplier: f64::NAN, clip_norm: 1.0, sampling_rate: 0.5, update_clip_norm: 1.0 },
        ] {
            let d = review_offer(&offer(plan), &budget(true, None), &Accountant::new(), false);
            assert_eq!(declined(&d), DeclineReason::PlanUnacceptable, "{plan:?}");
        }
    }

    #[test]
    fn a_manifest_that_does_not_match_its_digest_is_declined() {
        let mut o = offer(PrivacyPlan::Off);
        o.model_digest = model(2.0).digest();
        assert_eq!(declined(&review_offer(&o, &budget(false, None), &Accountant::new(), false)), DeclineReason::ModelMismatch);
    }

    fn release_record(round: u64, update: Digest) -> ReleaseRecord {
        let used = fedward_shared::wire::PrivacyUsed::off();
        ReleaseRecord::new(
            fedward_shared::wire::SiteId::new("a").unwrap(),
            RoundId(round),
            &used,
            10,
            0.0,
            update,
            time::OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap()
    }

    /// A ledger that lost releases the coordinator accepted is caught before any spend.
    #[test]
    fn a_certificate_near_its_end_is_warned_about() {
        let now = time::OffsetDateTime::now_utc();
        let days = time::Duration::days;
        // A year's certificate: warned in its last 14 days.
        let issued = now - days(300);
        assert_eq!(certificate_warning(now, issued, now + days(30)), None);
        assert!(certificate_warning(now, issued, now + days(3)).unwrap().contains("expires in 3days"));
        assert!(certificate_warning(now, issued, now - time::Duration::hours(1)).unwrap().contains("expired at"));
        // A 30-day certificate: renewed with 10 days left, warned with 7.5 left.
        let issued = now - days(20);
        assert_eq!(renewal_due(issued, now + days(10)), now);
        assert_eq!(certificate_warning(now, issued, now + days(10)), None);
        assert!(certificate_warning(now, now - days(23), now + days(7)).unwrap().contains("not renewed automatically"));
    }

    #[test]
    fn a_welcome_naming_another_site_is_refused() {
        let own = SiteId::new("alpha").unwrap();
        assert!(check_welcome_site(&own, &own).is_ok());
        let reason = check_welcome_site(&own, &SiteId::new("beta").unwrap()).unwrap_err();
        assert!(reason.contains("\"beta\"") && reason.contains("\"alpha\""), "{reason}");
    }

    #[test]
    fn acceptances_the_ledger_lacks_are_found() {
        let mut ledger = Ledger::new();
        for round in 1..=2 {
            let entry = ledger.prepare(Body::Release(release_record(round, Digest([round as u8; 32])))).unwrap();
            ledger.push(entry).unwrap();
        }
        let accepted = |round: u64, d: u8| AcceptedUpdate { round: RoundId(round), update_digest: Digest([d; 32]) };
        assert!(unrecorded_acceptances(&ledger, &[accepted(1, 1), accepted(2, 2)]).is_empty());
        assert!(unrecorded_acceptances(&ledger, &[]).is_empty());
        assert_eq!(unrecorded_acceptances(&ledger, &[accepted(2, 2), accepted(3, 3)]), [accepted(3, 3)]);
        // The same round with another update (not what this ledger released) is missing too.
        assert_eq!(unrecorded_acceptances(&ledger, &[accepted(1, 9)]), [accepted(1, 9)]);
        assert_eq!(unrecorded_acceptances(&Ledger::new(), &[accepted(1, 1)]).len(), 1);
    }

    #[test]
    fn a_recorded_round_is_resent_only_for_the_same_model_and_update() {
        let o = offer(SITE);
        let update = Digest([7; 32]);
        let cached = CachedRelease { round: RoundId(1), model_digest: o.model_digest, update_digest: update };
        let last = release_record(1, update);
        assert_eq!(prior_release(&o, None, None), Prior::Fresh);
        assert_eq!(prior_release(&o, Some(&release_record(0, update)), Some(&cached)), Prior::Fresh);
        assert_eq!(prior_release(&o, Some(&last), Some(&cached)), Prior::Resend);
        // The round moved on to another model: train again (the old spend stays counted).
        let moved = CachedRelease { model_digest: Digest([1; 32]), ..cached };
        assert_eq!(prior_release(&o, Some(&last), Some(&moved)), Prior::Fresh);
        // Recorded but not recoverable: never release the round a second time.
        assert_eq!(prior_release(&o, Some(&last), None), Prior::Unrecoverable);
        let other = CachedRelease { update_digest: Digest([8; 32]), ..cached };
        assert_eq!(prior_release(&o, Some(&last), Some(&other)), Prior::Unrecoverable);
    }

    #[test]
    fn only_changed_tensors_are_fetched_and_the_model_is_verified() {
        let old = model(1.0);
        let new = model(2.0);
        let old = CachedModel::new(old);
        let fetch = tensors_to_fetch(&new.specs(), Some(&old));
        assert_eq!(fetch, ["classifier.weight"]);
        assert_eq!(tensors_to_fetch(&new.specs(), None).len(), 2);
        let fetched = new.subset(fetch.iter().map(String::as_str)).unwrap();
        let assembled = assemble(&new.specs(), new.digest(), Some(old.clone()), fetched.clone()).unwrap();
        assert_eq!(*assembled.set, new);
        assert_eq!((assembled.specs.clone(), assembled.digest), (new.specs(), new.digest()));
        // A download shaped other than offered is refused ...
        let mut misshapen = fetched.clone();
        misshapen.insert("classifier.weight", fedward_shared::tensor::Tensor::zeros(vec![1]));
        let refused = assemble(&new.specs(), new.digest(), Some(old.clone()), misshapen).unwrap_err();
        assert!(matches!(refused, AssembleError::Shape { .. }), "{refused}");
        // ... the cached tensors the offer changed are not used in its place ...
        assert!(matches!(assemble(&new.specs(), new.digest(), Some(old.clone()), TensorSet::new()), Err(AssembleError::Missing(_))));
        // ... a manifest that is not the offered model's fails, as does one out of order.
        let mut lying = new.specs();
        lying[0].digest = Digest([7; 32]);
        assert!(matches!(assemble(&lying, new.digest(), Some(old.clone()), fetched.clone()), Err(AssembleError::Digest { .. })));
        let mut reversed = new.specs();
        reversed.reverse();
        let digest = manifest_digest(&reversed);
        assert!(matches!(assemble(&reversed, digest, Some(old), fetched), Err(AssembleError::Order)));
    }
}
