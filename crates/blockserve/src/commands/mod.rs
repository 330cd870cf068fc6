pub mod generate;
pub mod init;
pub mod logits;
