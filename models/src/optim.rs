//! AdamW as one pass over each parameter's values.
//!
//! candle-nn's `AdamW` performs the same update as about a dozen tensor operations per
//! parameter, each allocating a fresh buffer and running a scalar loop. For the 1.9M
//! parameters of a top layer this took about a third of every training step on CPU. Here
//! the moments live in plain vectors and one loop per parameter computes the step with the
//! same arithmetic in the same order, so the weights come out as candle-nn's would (the
//! test below checks it against candle-nn step by step). [`AdamW`] picks it on the CPU.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::optim::Optimizer as _;

/// AdamW's hyperparameters; the defaults are candle-nn's and PyTorch's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// AdamW on whatever device the parameters live: [`FusedAdamW`] on the CPU; on a GPU,
/// candle-nn's, whose tensor ops run there (the fused loop would copy every parameter to
/// the host and back at each step).
pub enum AdamW {
    Host(FusedAdamW),
    Device(candle_nn::optim::AdamW),
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        if vars.iter().all(|v| v.device().is_cpu()) {
            return Ok(Self::Host(FusedAdamW::new(vars, params)));
        }
        let AdamWParams { lr, beta1, beta2, eps, weight_decay } = params;
        let params = candle_nn::optim::ParamsAdamW { lr, beta1, beta2, eps, weight_decay };
        Ok(Self::Device(candle_nn::optim::AdamW::new(vars, params)?))
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Self::Host(o) => o.set_learning_rate(lr),
            Self::Device(o) => o.set_learning_rate(lr),
        }
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Self::Host(o) => o.step(grads),
            Self::Device(o) => o.step(grads),
        }
    }
}

struct Slot {
    var: Var,
    first_moment: Vec<f32>,
    second_moment: Vec<f32>,
}

/// AdamW (Loshchilov and Hutter 2019) with decoupled weight decay, over f32 `Var`s.
pub struct FusedAdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    step_t: i32,
}

impl FusedAdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Self {
        let slots = vars
            .into_iter()
            .map(|var| {
                let n = var.elem_count();
                Slot { var, first_moment: vec![0.0; n], second_moment: vec![0.0; n] }
            })
            .collect();
        Self { slots, params, step_t: 0 }
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One step from `grads`; a parameter without a gradient is left as it is, moments
    /// included, as candle-nn does.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = self.params;
        // The same f64 constants as candle-nn, applied as f32 the way its affine ops apply them.
        let (beta1, one_minus_beta1) = (p.beta1 as f32, (1.0 - p.beta1) as f32);
        let (beta2, one_minus_beta2) = (p.beta2 as f32, (1.0 - p.beta2) as f32);
        let scale_m = (1.0 / (1.0 - p.beta1.powi(self.step_t))) as f32;
        let scale_v = (1.0 / (1.0 - p.beta2.powi(self.step_t))) as f32;
        let decay = (1.0 - p.lr * p.weight_decay) as f32;
        let (lr, eps) = (p.lr as f32, p.eps as f32);
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else { continue };
            let grad = grad.flatten_all()?.to_vec1::<f32>()?;
            let mut theta = slot.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for (((t, m), v), g) in theta.iter_mut().zip(&mut slot.first_moment).zip(&mut slot.second_moment).zip(&grad) {
                *m = *m * beta1 + *g * one_minus_beta1;
                *v = *v * beta2 + (*g * *g) * one_minus_beta2;
                let adjusted = (*m * scale_m) / ((*v * scale_v).sqrt() + eps);
                *t = *t * decay - adjusted * lr;
            }
            slot.var.set(&Tensor::from_vec(theta, slot.var.shape(), slot.var.device())?)?;
        }
        Ok(())
    }
}

/// SGD with heavy-ball momentum and coupled weight decay, as PyTorch's `SGD`:
/// `g += wd w; v = m v + g; w -= lr v`. In tensor ops, so it runs wherever the parameters
/// live; DP-SGD trains few parameters, so a step is cheap either way.
pub struct MomentumSgd {
    slots: Vec<(Var, Option<Tensor>)>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
}

impl MomentumSgd {
    pub fn new(vars: Vec<Var>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        Self { slots: vars.into_iter().map(|v| (v, None)).collect(), lr, momentum, weight_decay }
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// One step from `grads`; a parameter without a gradient is left as it is.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (var, velocity) in &mut self.slots {
            let Some(grad) = grads.get(var.as_tensor()) else { continue };
            let grad = if self.weight_decay > 0.0 { (grad + (var.as_tensor() * self.weight_decay)?)? } else { grad.clone() };
            let v = match velocity.take() {
                Some(v) if self.momentum > 0.0 => ((v * self.momentum)? + grad)?,
                _ => grad,
            };
            var.set(&(var.as_tensor() - (&v * self.lr)?)?)?;
            *velocity = Some(v);
        }
        Ok(())
    }
}

/// The optimiser a training plan names.
pub enum LocalOptimizer {
    AdamW(AdamW),
    Sgd(MomentumSgd),
}

impl LocalOptimizer {
    pub fn new(vars: Vec<Var>, optimizer: fedward_shared::plan::Optimizer, lr: f64, weight_decay: f64) -> Result<Self> {
        Ok(match optimizer {
            fedward_shared::plan::Optimizer::AdamW => {
                Self::AdamW(AdamW::new(vars, AdamWParams { lr, weight_decay, ..Default::default() })?)
            }
            fedward_shared::plan::Optimizer::Sgd { momentum } => Self::Sgd(MomentumSgd::new(vars, lr, momentum, weight_decay)),
        })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Self::AdamW(o) => o.set_learning_rate(lr),
            Self::Sgd(o) => o.set_learning_rate(lr),
        }
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Self::AdamW(o) => o.step(grads),
            Self::Sgd(o) => o.step(grads),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::optim::{AdamW as CandleAdamW, Optimizer, ParamsAdamW};
    use rand::{Rng, SeedableRng};

    #[test]
    fn steps_like_candle_nn_adamw() {
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let start = [random(12), random(5)];
        let make = || -> Vec<Var> {
            vec![
                Var::from_tensor(&Tensor::from_vec(start[0].clone(), (3, 4), &dev).unwrap()).unwrap(),
                Var::from_tensor(&Tensor::from_vec(start[1].clone(), 5, &dev).unwrap()).unwrap(),
            ]
        };
        let (ours_vars, theirs_vars) = (make(), make());
        let mut ours = FusedAdamW::new(ours_vars.clone(), AdamWParams { lr: 0.01, weight_decay: 0.1, ..Default::default() });
        let mut theirs = CandleAdamW::new(theirs_vars.clone(), ParamsAdamW { lr: 0.01, weight_decay: 0.1, ..Default::default() }).unwrap();
        let target = [Tensor::from_vec(random(12), (3, 4), &dev).unwrap(), Tensor::from_vec(random(5), 5, &dev).unwrap()];
        for step in 0..20 {
            let lr = 0.01 * (1.0 - step as f64 / 20.0);
            ours.set_learning_rate(lr);
            theirs.set_learning_rate(lr);
            // A different loss per step; on odd steps only the first parameter has a gradient.
            let loss = |vars: &[Var]| -> Tensor {
                let first = (vars[0].as_tensor() - &target[0]).unwrap().sqr().unwrap().sum_all().unwrap();
                if step % 2 == 1 {
                    first
                } else {
                    let second = (vars[1].as_tensor() * &target[1]).unwrap().sum_all().unwrap();
                    (first + second).unwrap()
                }
            };
            ours.step(&loss(&ours_vars).backward().unwrap()).unwrap();
            theirs.step(&loss(&theirs_vars).backward().unwrap()).unwrap();
            for (a, b) in ours_vars.iter().zip(&theirs_vars) {
                let a = a.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(worst < 1e-6, "step {step}: differs from candle-nn by {worst}");
            }
        }
    }

    /// Gradients `c` for `var` (the gradient of `sum(var * c)`).
    fn grads_of(var: &Var, c: &[f32]) -> GradStore {
        let c = Tensor::from_vec(c.to_vec(), var.shape(), var.device()).unwrap();
        var.as_tensor().mul(&c).unwrap().sum_all().unwrap().backward().unwrap()
    }

    fn values(var: &Var) -> Vec<f32> {
        var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn momentum_sgd_steps_like_pytorch() {
        let var = Var::from_tensor(&Tensor::from_vec(vec![1.0f32, -2.0, 0.5], 3, &Device::Cpu).unwrap()).unwrap();
        let mut sgd = MomentumSgd::new(vec![var.clone()], 0.1, 0.9, 0.0);
        let g = [0.5f32, 1.0, -2.0];
        sgd.step(&grads_of(&var, &g)).unwrap();
        // v1 = g; w1 = w0 - lr g.
        let w1: Vec<f32> = [1.0f32, -2.0, 0.5].iter().zip(&g).map(|(w, g)| w - 0.1 * g).collect();
        assert!(values(&var).iter().zip(&w1).all(|(a, b)| (a - b).abs() < 1e-6));
        sgd.step(&grads_of(&var, &g)).unwrap();
        // v2 = 0.9 g + g; w2 = w1 - lr v2.
        let w2: Vec<f32> = w1.iter().zip(&g).map(|(w, g)| w - 0.1 * 1.9 * g).collect();
        assert!(values(&var).iter().zip(&w2).all(|(a, b)| (a - b).abs() < 1e-6), "{:?} vs {w2:?}", values(&var));
    }
}
