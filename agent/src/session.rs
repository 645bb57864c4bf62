//! The agent's decisions, without I/O: whether to take a round, which tensors of the
//! global model to fetch, and how to assemble the model from cache and download.
//!
//! Nothing the coordinator sends can override the site's own limits: a plan without
//! differential privacy when the site requires it, or one that would take the site past
//! its budget, is declined here.

use fedward_shared::config::SiteBudget;
use fedward_shared::plan::PrivacyPlan;
use fedward_shared::tensor::{manifest_digest, Digest, TensorSet, TensorSpec};
use fedward_shared::wire::{DeclineReason, RoundOffer};

/// What to do with an offer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Train,
    Decline { reason: DeclineReason, message: String },
}

fn decline(reason: DeclineReason, message: impl Into<String>) -> Decision {
    Decision::Decline { reason, message: message.into() }
}

/// Reviews an offer against the site's own rules. `rounds_released` counts the updates
/// this site has already sent (from its ledger).
pub fn review_offer(offer: &RoundOffer, budget: &SiteBudget, rounds_released: u64) -> Decision {
    let plan = &offer.plan;
    if budget.require_dp && plan.privacy == PrivacyPlan::Off {
        return decline(
            DeclineReason::PlanUnacceptable,
            "the plan has no differential privacy and this site requires it (budget.require_dp)",
        );
    }
    if plan.privacy != PrivacyPlan::Off {
        // Never train under a privacy plan this agent cannot honour: declining is safe,
        // sending an update without the promised protection is not.
        return decline(
            DeclineReason::PlanUnacceptable,
            format!("{} differential privacy is not available in this agent version", plan.privacy.mode_name()),
        );
    }
    if let Some(max) = budget.max_rounds {
        if rounds_released >= max {
            return decline(
                DeclineReason::BudgetExhausted,
                format!("this site's budget allows {max} rounds and {rounds_released} were released"),
            );
        }
    }
    if plan.trainable_tensors.is_empty() {
        return decline(DeclineReason::PlanUnacceptable, "the plan trains no tensor");
    }
    if let Some(missing) = plan.trainable_tensors.iter().find(|n| !offer.manifest.iter().any(|s| &s.name == *n)) {
        return decline(DeclineReason::ModelMismatch, format!("trainable tensor {missing} is not in the offered model"));
    }
    if manifest_digest(&offer.manifest) != offer.model_digest {
        return decline(DeclineReason::ModelMismatch, "the offered manifest does not match the offered model digest");
    }
    Decision::Train
}

/// The tensors of `manifest` that `cache` lacks or holds with another digest.
pub fn tensors_to_fetch(manifest: &[TensorSpec], cache: Option<&TensorSet>) -> Vec<String> {
    manifest
        .iter()
        .filter(|spec| {
            cache.and_then(|c| c.get(&spec.name)).is_none_or(|t| t.shape() != spec.shape.as_slice() || t.digest() != spec.digest)
        })
        .map(|spec| spec.name.clone())
        .collect()
}

/// Why the global model could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("tensor {0} of the offered model was neither cached nor received")]
    Missing(String),
    #[error("assembled model has digest {actual}, the offer announced {expected}")]
    Digest { expected: Digest, actual: Digest },
}

/// Builds the round's global model from cached tensors that still match and the fetched
/// ones, and checks it against the offer's digest.
pub fn assemble(
    manifest: &[TensorSpec],
    expected: Digest,
    cache: Option<TensorSet>,
    mut fetched: TensorSet,
) -> Result<TensorSet, AssembleError> {
    let mut cache = cache.unwrap_or_default();
    let mut model = TensorSet::new();
    for spec in manifest {
        let t = fetched
            .remove(&spec.name)
            .or_else(|| cache.remove(&spec.name).filter(|t| t.digest() == spec.digest))
            .ok_or_else(|| AssembleError::Missing(spec.name.clone()))?;
        model.insert(spec.name.clone(), t);
    }
    let actual = model.digest();
    if actual != expected {
        return Err(AssembleError::Digest { expected, actual });
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use fedward_shared::plan::{Trainable, TrainingPlan};
    use fedward_shared::tensor::Tensor;
    use fedward_shared::wire::{PrivacyMode, PrivacyPolicy, RoundId};

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
            round: RoundId(1),
            model_digest: m.digest(),
            manifest: m.specs(),
            plan: TrainingPlan {
                local_epochs: 1,
                batch_size: 4,
                learning_rate: 1e-3,
                warmup_ratio: 0.0,
                weight_decay: 0.0,
                max_grad_norm: 0.0,
                max_seq_len: 16,
                trainable: Trainable::Head,
                trainable_tensors: vec!["classifier.weight".into()],
                seed: 0,
                privacy,
            },
            policy: PrivacyPolicy { mode: PrivacyMode::Off, min_noise_multiplier: 0.0, max_clip_norm: 1.0 },
            deadline_secs: 60,
            total_rounds: 3,
        }
    }

    fn budget(require_dp: bool, max_rounds: Option<u64>) -> SiteBudget {
        SiteBudget { max_epsilon: 8.0, delta: 1e-5, max_rounds, require_dp }
    }

    #[test]
    fn a_site_that_requires_dp_declines_a_plan_without_it() {
        let d = review_offer(&offer(PrivacyPlan::Off), &budget(true, None), 0);
        assert!(matches!(d, Decision::Decline { reason: DeclineReason::PlanUnacceptable, .. }));
        assert_eq!(review_offer(&offer(PrivacyPlan::Off), &budget(false, None), 0), Decision::Train);
    }

    #[test]
    fn a_privacy_plan_the_agent_cannot_apply_is_declined_not_ignored() {
        let plan = PrivacyPlan::SiteLevel { noise_multiplier: 1.0, clip_norm: 1.0 };
        let d = review_offer(&offer(plan), &budget(false, None), 0);
        assert!(matches!(d, Decision::Decline { reason: DeclineReason::PlanUnacceptable, .. }), "{d:?}");
    }

    #[test]
    fn max_rounds_is_a_hard_limit() {
        assert_eq!(review_offer(&offer(PrivacyPlan::Off), &budget(false, Some(2)), 1), Decision::Train);
        let d = review_offer(&offer(PrivacyPlan::Off), &budget(false, Some(2)), 2);
        assert!(matches!(d, Decision::Decline { reason: DeclineReason::BudgetExhausted, .. }));
    }

    #[test]
    fn a_manifest_that_does_not_match_its_digest_is_declined() {
        let mut o = offer(PrivacyPlan::Off);
        o.model_digest = model(2.0).digest();
        assert!(matches!(
            review_offer(&o, &budget(false, None), 0),
            Decision::Decline { reason: DeclineReason::ModelMismatch, .. }
        ));
    }

    #[test]
    fn only_changed_tensors_are_fetched_and_the_model_is_verified() {
        let old = model(1.0);
        let new = model(2.0);
        let fetch = tensors_to_fetch(&new.specs(), Some(&old));
        assert_eq!(fetch, ["classifier.weight"]);
        assert_eq!(tensors_to_fetch(&new.specs(), None).len(), 2);
        let fetched = new.subset(fetch.iter().map(String::as_str)).unwrap();
        let assembled = assemble(&new.specs(), new.digest(), Some(old.clone()), fetched).unwrap();
        assert_eq!(assembled, new);
        // A tampered download fails the digest check.
        let mut bad = new.subset(["classifier.weight"]).unwrap();
        bad.get_mut("classifier.weight").unwrap().data_mut()[0] = 9.0;
        assert!(assemble(&new.specs(), new.digest(), Some(old), bad).is_err());
    }
}
