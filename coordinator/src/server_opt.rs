//! Server-side optimisers (Reddi et al. 2021, "Adaptive Federated Optimization"): how a
//! round's combined update moves the global model.
//!
//! The combined update `d` (FedAvg's weighted mean delta, or the median or trimmed mean)
//! is the pseudo-gradient; [`step`] turns it, in place, into the step `s` the store adds to
//! the global model (`x += s`), updating the optimiser's state ([`ServerState`]: the moments
//! `m` and `v`, f32, one value per trainable value each) on the way. The formulas are the
//! ones documented on [`ServerOptimizer`]; every coordinate is computed in f64 from f32
//! inputs and rounded once per stored value, so a step is a pure function of the state and
//! the update (a resumed federation repeats it bit for bit).
//!
//! The state is checkpointed beside each global model (`store`), so it lives in memory
//! only while a checkpoint is written: the update and the moments, 1x + 2x the trainable
//! tensors for FedAdam and FedYogi. Pure: no I/O, no clock.

use fedward_shared::config::ServerOptimizer;
use fedward_shared::tensor::{Tensor, TensorSet};

/// The names of the first and second moments of tensor `name` in a state file.
pub fn moment_names(name: &str) -> [String; 2] {
    [format!("m.{name}"), format!("v.{name}")]
}

/// The optimiser's state: per trainable tensor, the first moment (FedAvgM, FedAdam,
/// FedYogi) and the second (FedAdam, FedYogi), each shaped like the tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerState {
    pub m: TensorSet,
    pub v: TensorSet,
}

/// A state that does not fit the update it should step with.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("optimizer state for {name} is shaped {state:?}, the update {update:?}")]
    Shape { name: String, state: Vec<usize>, update: Vec<usize> },
    #[error("optimizer state holds {0}, which is neither m.<tensor> nor v.<tensor>")]
    UnknownName(String),
}

impl ServerState {
    /// The state before the first round: `m = 0`, `v = tau^2` (FedAdam, FedYogi), for the
    /// tensors of `update`.
    pub fn initial(optimizer: &ServerOptimizer, update: &TensorSet) -> Self {
        let mut state = Self::default();
        state.fill_missing(optimizer, update);
        state
    }

    /// Adds the initial state of every tensor of `update` the state lacks (a tensor that
    /// started to train), and drops what `update` does not hold (one that stopped):
    /// returns the names added and dropped, for the log.
    pub fn fill_missing(&mut self, optimizer: &ServerOptimizer, update: &TensorSet) -> (Vec<String>, Vec<String>) {
        let (mut added, mut dropped) = (Vec::new(), Vec::new());
        let v0 = match optimizer {
            ServerOptimizer::FedAdam { tau, .. } | ServerOptimizer::FedYogi { tau, .. } => (tau * tau) as f32,
            _ => 0.0,
        };
        let moments = optimizer.moments();
        for (k, (set, init)) in [(&mut self.m, 0.0f32), (&mut self.v, v0)].into_iter().enumerate() {
            let stale: Vec<String> = set.names().filter(|n| k >= moments || !update.contains(n)).map(str::to_owned).collect();
            for name in stale {
                set.remove(&name);
                dropped.push(name);
            }
            if k >= moments {
                continue;
            }
            for (name, t) in update.iter() {
                if !set.contains(name) {
                    let mut fresh = Tensor::zeros(t.shape().to_vec());
                    fresh.data_mut().fill(init);
                    set.insert(name, fresh);
                    added.push(name.to_owned());
                }
            }
        }
        added.sort();
        added.dedup();
        dropped.sort();
        dropped.dedup();
        (added, dropped)
    }

    /// The state as one set of tensors named `m.<tensor>` and `v.<tensor>` (a state file).
    pub fn into_file_set(mut self) -> TensorSet {
        let mut out = TensorSet::new();
        for (k, set) in [&mut self.m, &mut self.v].into_iter().enumerate() {
            for name in set.names().map(str::to_owned).collect::<Vec<_>>() {
                if let Some(t) = set.remove(&name) {
                    let [m, v] = moment_names(&name);
                    out.insert(if k == 0 { m } else { v }, t);
                }
            }
        }
        out
    }

    /// Takes a state file's tensors back apart.
    pub fn from_file_set(mut set: TensorSet) -> Result<Self, StateError> {
        let mut state = Self::default();
        for name in set.names().map(str::to_owned).collect::<Vec<_>>() {
            let Some(t) = set.remove(&name) else { continue };
            match (name.strip_prefix("m."), name.strip_prefix("v.")) {
                (Some(n), _) => state.m.insert(n, t),
                (_, Some(n)) => state.v.insert(n, t),
                _ => return Err(StateError::UnknownName(name)),
            };
        }
        Ok(state)
    }

    /// Bytes the state holds.
    pub fn byte_len(&self) -> usize {
        self.m.byte_len() + self.v.byte_len()
    }
}

/// Turns the combined update `update` into the step to add to the global model, in place,
/// and advances `state` (which must hold the moments `optimizer` keeps for every tensor of
/// `update`: [`ServerState::fill_missing`]). Plain FedAvg at learning rate 1 leaves the
/// update exactly as it is.
pub fn step(optimizer: &ServerOptimizer, state: &mut ServerState, update: &mut TensorSet) -> Result<(), StateError> {
    if optimizer.is_identity() {
        return Ok(());
    }
    for (name, d) in update.iter_mut() {
        let shaped = |set: &TensorSet| -> Result<(), StateError> {
            match set.get(name) {
                Some(s) if s.shape() == d.shape() => Ok(()),
                Some(s) => Err(StateError::Shape { name: name.to_owned(), state: s.shape().to_vec(), update: d.shape().to_vec() }),
                None => Err(StateError::Shape { name: name.to_owned(), state: Vec::new(), update: d.shape().to_vec() }),
            }
        };
        match *optimizer {
            ServerOptimizer::FedAvg { learning_rate } => {
                for x in d.data_mut() {
                    *x = (learning_rate * f64::from(*x)) as f32;
                }
            }
            ServerOptimizer::FedAvgM { learning_rate, momentum } => {
                shaped(&state.m)?;
                let m = state.m.get_mut(name).map(Tensor::data_mut).unwrap_or_default();
                for (x, m) in d.data_mut().iter_mut().zip(m) {
                    *m = (momentum * f64::from(*m) + f64::from(*x)) as f32;
                    *x = (learning_rate * f64::from(*m)) as f32;
                }
            }
            ServerOptimizer::FedAdam { learning_rate, beta1, beta2, tau }
            | ServerOptimizer::FedYogi { learning_rate, beta1, beta2, tau } => {
                shaped(&state.m)?;
                shaped(&state.v)?;
                let yogi = matches!(optimizer, ServerOptimizer::FedYogi { .. });
                let m = state.m.get_mut(name).map(Tensor::data_mut).unwrap_or_default();
                let v = state.v.get_mut(name).map(Tensor::data_mut).unwrap_or_default();
                for ((x, m), v) in d.data_mut().iter_mut().zip(m).zip(v) {
                    let g = f64::from(*x);
                    let g2 = g * g;
                    *m = (beta1 * f64::from(*m) + (1.0 - beta1) * g) as f32;
                    let v_old = f64::from(*v);
                    let v_new = if yogi { v_old - (1.0 - beta2) * g2 * sign(v_old - g2) } else { beta2 * v_old + (1.0 - beta2) * g2 };
                    *v = v_new as f32;
                    *x = (learning_rate * f64::from(*m) / (f64::from(*v).sqrt() + tau)) as f32;
                }
            }
        }
    }
    Ok(())
}

/// The sign function of the paper: 0 at 0 (`f64::signum` gives 1 there).
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(values: &[f32]) -> TensorSet {
        let mut set = TensorSet::new();
        set.insert("w", Tensor::new(vec![values.len()], values.to_vec()).unwrap());
        set
    }

    /// Runs `optimizer` over the rounds' updates; returns each round's step.
    fn steps(optimizer: ServerOptimizer, rounds: &[&[f32]]) -> (Vec<Vec<f32>>, ServerState) {
        let mut state = ServerState::initial(&optimizer, &update(rounds[0]));
        let out = rounds
            .iter()
            .map(|d| {
                let mut u = update(d);
                step(&optimizer, &mut state, &mut u).unwrap();
                u.get("w").unwrap().data().to_vec()
            })
            .collect();
        (out, state)
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1e-3), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn fedavg_at_learning_rate_one_is_the_update_itself() {
        let values = [0.1f32, -3.0e-7, 1.0e30, 0.0];
        let (out, state) = steps(ServerOptimizer::default(), &[&values]);
        assert_eq!(out[0], values);
        assert_eq!(state, ServerState::default(), "no state kept");
        let (out, _) = steps(ServerOptimizer::FedAvg { learning_rate: 0.5 }, &[&[2.0, -1.0]]);
        assert_eq!(out[0], [1.0, -0.5]);
    }

    /// m = mu m + d, x += lr m, by hand: mu 0.9, lr 0.5, d = 1, 1, -2.
    #[test]
    fn fedavgm_matches_hand_computed_steps() {
        let (out, state) = steps(ServerOptimizer::FedAvgM { learning_rate: 0.5, momentum: 0.9 }, &[&[1.0], &[1.0], &[-2.0]]);
        // m: 1, 1.9, 1.71 - 2 = -0.29.
        close(&out.concat(), &[0.5, 0.95, -0.145]);
        close(state.m.get("w").unwrap().data(), &[-0.29]);
        assert!(state.v.is_empty());
    }

    /// b1 0.5, b2 0.75, tau 0.5 (v starts at 0.25), lr 1, d = 2 then 0.5.
    #[test]
    fn fedadam_matches_hand_computed_steps() {
        let adam = ServerOptimizer::FedAdam { learning_rate: 1.0, beta1: 0.5, beta2: 0.75, tau: 0.5 };
        let (out, state) = steps(adam, &[&[2.0], &[0.5]]);
        // Round 1: m = 0.5*0 + 0.5*2 = 1; v = 0.75*0.25 + 0.25*4 = 1.1875.
        // Round 2: m = 0.5*1 + 0.5*0.5 = 0.75; v = 0.75*1.1875 + 0.25*0.25 = 0.953125.
        close(&out.concat(), &[1.0 / (1.1875f64.sqrt() + 0.5), 0.75 / (0.953125f64.sqrt() + 0.5)]);
        close(state.m.get("w").unwrap().data(), &[0.75]);
        close(state.v.get("w").unwrap().data(), &[0.953125]);
    }

    /// Yogi's v moves by (1 - b2) d^2 towards d^2, never past it by the EMA's pull: same
    /// settings as the FedAdam test, d = 2, 0.5, 0.5.
    #[test]
    fn fedyogi_matches_hand_computed_steps() {
        let yogi = ServerOptimizer::FedYogi { learning_rate: 1.0, beta1: 0.5, beta2: 0.75, tau: 0.5 };
        let (out, state) = steps(yogi, &[&[2.0], &[0.5], &[0.5]]);
        // v: 0.25 - 0.25*4*sign(0.25 - 4) = 1.25; 1.25 - 0.25*0.25*sign(1.25 - 0.25) = 1.1875;
        // 1.1875 - 0.0625 = 1.125. m: 1, 0.75, 0.625.
        close(&out.concat(), &[1.0 / (1.25f64.sqrt() + 0.5), 0.75 / (1.1875f64.sqrt() + 0.5), 0.625 / (1.125f64.sqrt() + 0.5)]);
        close(state.v.get("w").unwrap().data(), &[1.125]);
        // sign(0) is 0: v = d^2 stays where it is.
        assert_eq!(sign(0.0), 0.0);
        let (_, state) = steps(yogi, &[&[0.5]]);
        close(state.v.get("w").unwrap().data(), &[0.25]);
    }

    /// Coordinates are independent: a vector steps as its values one by one.
    #[test]
    fn every_coordinate_steps_on_its_own() {
        let adam = ServerOptimizer::FedYogi { learning_rate: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 };
        let rounds: [&[f32]; 3] = [&[0.5, -1e-4, 0.0], &[0.25, 3e-4, 2.0], &[-1.0, 0.0, 1e-6]];
        let (joint, _) = steps(adam, &rounds);
        for i in 0..3 {
            let single: Vec<Vec<f32>> = rounds.iter().map(|r| vec![r[i]]).collect();
            let single: Vec<&[f32]> = single.iter().map(Vec::as_slice).collect();
            let (alone, _) = steps(adam, &single);
            for (j, step) in alone.iter().enumerate() {
                assert_eq!(joint[j][i], step[0]);
            }
        }
    }

    #[test]
    fn state_round_trips_through_its_file_set_and_follows_the_trainable_tensors() {
        let adam = ServerOptimizer::FedAdam { learning_rate: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.01 };
        let (_, state) = steps(adam, &[&[1.0, 2.0]]);
        let file = state.clone().into_file_set();
        assert_eq!(file.names().collect::<Vec<_>>(), ["m.w", "v.w"]);
        assert_eq!(ServerState::from_file_set(file).unwrap(), state);
        let mut stray = TensorSet::new();
        stray.insert("w", Tensor::zeros(vec![1]));
        assert_eq!(ServerState::from_file_set(stray), Err(StateError::UnknownName("w".into())));
        // A tensor that starts training gets the initial state; one that stops is dropped.
        let mut state = state;
        let mut next = update(&[0.0, 0.0]);
        next.remove("w");
        next.insert("u", Tensor::zeros(vec![3]));
        let (added, dropped) = state.fill_missing(&adam, &next);
        assert_eq!((added, dropped), (vec!["u".to_owned()], vec!["w".to_owned()]));
        close(state.v.get("u").unwrap().data(), &[1e-4; 3]);
        assert_eq!(state.byte_len(), 2 * 3 * 4);
        // A state shaped otherwise than the update is refused, not stepped.
        let mut wrong = update(&[1.0, 2.0, 3.0]);
        wrong.remove("w");
        wrong.insert("u", Tensor::zeros(vec![4]));
        assert!(matches!(step(&adam, &mut state, &mut wrong), Err(StateError::Shape { .. })));
    }
}
