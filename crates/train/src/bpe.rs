//! The corpus's tokenizer: byte-level BPE (GPT-2's pre-tokenization, no prefix
//! space, so code keeps its exact whitespace) trained on the training split,
//! with `<|endoftext|>` as id 0. And the splits encoded with it: one token file
//! per split, little-endian u16 ids, each file's tokens followed by id 0.

use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

use crate::{input, io_err, Result, TrainError};

/// The end-of-text token, id 0: separates files in the token files and stops
/// generation.
pub const END_OF_TEXT: &str = "<|endoftext|>";

type Bpe = TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

fn tok_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Input(format!("tokenizer: {e}"))
}

/// Train a byte-level BPE of `vocab_size` entries on `texts`; returns its
/// `tokenizer.json`.
pub fn train<'a>(texts: impl Iterator<Item = &'a str> + Send, vocab_size: usize) -> Result<String> {
    if !(257..=65535).contains(&vocab_size) {
        return input(format!("--vocab-size {vocab_size}: must be 257..=65535 (the 256 bytes, end of text, u16 ids)"));
    }
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tok: Bpe = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(byte_level)))
        .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
        .build()
        .map_err(tok_err)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tok.train(&mut trainer, texts).map_err(tok_err)?;
    tok.to_string(false).map_err(tok_err)
}

/// Encode `texts` with `tokenizer_json`, each followed by end of text.
pub fn encode<'a>(tokenizer_json: &str, texts: impl Iterator<Item = &'a str>) -> Result<Vec<u16>> {
    let tok = blockserve_text_tokenizer(tokenizer_json)?;
    let mut out = Vec::new();
    for t in texts {
        let ids = tok.encode(t, false).map_err(tok_err)?;
        out.extend(ids.get_ids().iter().map(|&i| i as u16));
        out.push(0);
    }
    Ok(out)
}

fn blockserve_text_tokenizer(json: &str) -> Result<tokenizers::Tokenizer> {
    let tok: tokenizers::Tokenizer = json.parse().map_err(tok_err)?;
    if tok.token_to_id(END_OF_TEXT) != Some(0) {
        return input(format!("the tokenizer must map {END_OF_TEXT} to id 0"));
    }
    if tok.get_vocab_size(true) > 65536 {
        return input("the tokenizer has more than 65536 entries; token files hold u16 ids");
    }
    Ok(tok)
}

/// Write ids as little-endian u16.
pub fn write_tokens(path: &Path, ids: &[u16]) -> Result<()> {
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// Read a token file written by [`write_tokens`].
pub fn read_tokens(path: &Path) -> Result<Vec<u16>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.len() % 2 != 0 {
        return Err(TrainError::File { path: path.to_path_buf(), msg: "odd length: not a file of u16 ids".into() });
    }
    Ok(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}
