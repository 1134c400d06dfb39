//! The chat template: a conversation rendered as the prompt the model was trained on.
//!
//! The template is the model file's own (`tokenizer.chat_template` in GGUF metadata, or
//! `chat_template` in a safetensors folder's `tokenizer_config.json`), a Jinja program
//! run by minijinja with the variables Hugging Face templates expect: `messages` (each
//! with `role` and `content`), `add_generation_prompt`, `bos_token` and `eos_token`.
//! A model without one gets ChatML, written as a template too ([`CHATML`]).

use minijinja::{Environment, Error, ErrorKind, Value, context};
use pollen_shard::{ModelFile, PollenTokenizer};
use serde::{Deserialize, Serialize};

/// The template used when the model file carries none: ChatML, the format of SmolLM2,
/// Qwen and many others.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The name the template is registered under.
const NAME: &str = "chat";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a conversation could not be rendered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatTemplateError {
    /// The template itself refused the conversation (`raise_exception`), e.g. roles that
    /// do not alternate.
    #[error("the model's chat template refuses this conversation: {0}")]
    Refused(String),
    /// The template failed to run.
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// Where the template came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateSource {
    /// The model file's own.
    Model,
    /// The built-in ChatML: the model file has none.
    Fallback,
    /// The built-in ChatML: the model file's would not compile.
    FallbackBroken,
}

/// A compiled chat template with the model's special tokens.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    source: TemplateSource,
}

/// The `raise_exception(msg)` Hugging Face templates call to refuse a conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// The few Python string methods templates use (`.strip()`, `.startswith(..)`, ...).
fn python_methods(
    _state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let Some(s) = value.as_str() else {
        return Err(Error::from(ErrorKind::UnknownMethod));
    };
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str());
    Ok(match (method, args.len()) {
        ("strip", 0) => Value::from(s.trim()),
        ("lstrip", 0) => Value::from(s.trim_start()),
        ("rstrip", 0) => Value::from(s.trim_end()),
        ("strip", 1) => Value::from(s.trim_matches(|c| arg(0).is_some_and(|a| a.contains(c)))),
        ("lstrip", 1) => {
            Value::from(s.trim_start_matches(|c| arg(0).is_some_and(|a| a.contains(c))))
        }
        ("rstrip", 1) => Value::from(s.trim_end_matches(|c| arg(0).is_some_and(|a| a.contains(c)))),
        ("startswith", 1) => Value::from(arg(0).is_some_and(|a| s.starts_with(a))),
        ("endswith", 1) => Value::from(arg(0).is_some_and(|a| s.ends_with(a))),
        ("upper", 0) => Value::from(s.to_uppercase()),
        ("lower", 0) => Value::from(s.to_lowercase()),
        ("split", 1) => Value::from(
            s.split(arg(0).unwrap_or(" "))
                .map(str::to_string)
                .collect::<Vec<_>>(),
        ),
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

fn environment(source: &str) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(python_methods);
    env.add_function("raise_exception", raise_exception);
    env.add_template_owned(NAME, source.to_string())?;
    Ok(env)
}

/// The text of token `key` (`tokenizer.ggml.bos_token_id`, ...) in GGUF metadata.
fn gguf_token(file: &ModelFile, key: &str) -> Option<String> {
    use candle_core::quantized::gguf_file::Value as V;
    let ct = file.gguf_content()?;
    let id = match ct.metadata.get(key)? {
        V::U32(x) => usize::try_from(*x).ok()?,
        V::I32(x) => usize::try_from(*x).ok()?,
        V::U64(x) => usize::try_from(*x).ok()?,
        V::I64(x) => usize::try_from(*x).ok()?,
        _ => return None,
    };
    let tokens = ct.metadata.get("tokenizer.ggml.tokens")?.to_vec().ok()?;
    tokens.get(id)?.to_string().ok().cloned()
}

impl ChatTemplate {
    /// Compiles `source` (or ChatML when `None`) with these special tokens. A template
    /// that does not compile falls back to ChatML, with a warning.
    pub fn new(source: Option<&str>, bos: &str, eos: &str) -> Self {
        let (env, source) = match source.map(environment) {
            Some(Ok(env)) => (env, TemplateSource::Model),
            Some(Err(e)) => {
                tracing::warn!("the model's chat template does not compile ({e}); using ChatML");
                (Self::chatml_env(), TemplateSource::FallbackBroken)
            }
            None => (Self::chatml_env(), TemplateSource::Fallback),
        };
        Self {
            env,
            bos: bos.into(),
            eos: eos.into(),
            source,
        }
    }

    fn chatml_env() -> Environment<'static> {
        #[allow(clippy::expect_used)]
        environment(CHATML).expect("the built-in ChatML template compiles")
    }

    /// The template of an opened model: its own, with its BOS and EOS tokens.
    pub fn from_model(file: &ModelFile, tok: &PollenTokenizer) -> Self {
        let bos = gguf_token(file, "tokenizer.ggml.bos_token_id").unwrap_or_default();
        let eos = gguf_token(file, "tokenizer.ggml.eos_token_id").unwrap_or_default();
        let t = Self::new(tok.chat_template(), &bos, &eos);
        if t.source == TemplateSource::Fallback {
            tracing::info!("the model file has no chat template; chats use ChatML");
        }
        t
    }

    /// Where the template came from.
    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// The prompt for `messages`; with `add_generation_prompt`, it opens the assistant's
    /// turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => {
                ChatTemplateError::Refused(e.detail().unwrap_or("refused").to_string())
            }
            _ => ChatTemplateError::Render(format!("{e:#}")),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// SmolLM2-Instruct's template, as its GGUF file carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_fallback_renders_turns_and_opens_the_answer() {
        let t = ChatTemplate::new(None, "", "");
        assert_eq!(t.source(), TemplateSource::Fallback);
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&msgs, false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn model_template_inserts_its_default_system_prompt() {
        let t = ChatTemplate::new(Some(SMOLLM2), "<|im_start|>", "<|im_end|>");
        assert_eq!(t.source(), TemplateSource::Model);
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn bos_python_methods_and_refusals() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' and loop.first %}{{ raise_exception('must start with user') }}{% endif %}[{{ m.content.strip() }}]{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(Some(src), "<s>", "</s>");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  x ")], false)
                .unwrap(),
            "<s>[x]</s>"
        );
        let err = t
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(
            matches!(&err, ChatTemplateError::Refused(m) if m.contains("must start with user")),
            "{err}"
        );
    }

    #[test]
    fn a_broken_template_falls_back_to_chatml() {
        let t = ChatTemplate::new(Some("{% for %}"), "", "");
        assert_eq!(t.source(), TemplateSource::FallbackBroken);
        assert!(
            t.render(&[ChatMessage::new("user", "a")], true)
                .unwrap()
                .starts_with("<|im_start|>user\na")
        );
    }
}
