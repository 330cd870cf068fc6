pub mod bench;
pub mod client;
pub mod generate;
pub mod init;
pub mod logits;
pub mod tiers;
pub mod up;
