//! fedward's model: a BERT sequence classifier in candle, its tokenizer, datasets,
//! local training and evaluation, and safetensors import/export.

pub mod bert;
pub mod eval;
pub mod io;
pub mod optim;
pub mod text;
pub mod train;
pub mod trainer;

pub use trainer::{LocalUpdate, TrainContext, TrainError, Trainer};
