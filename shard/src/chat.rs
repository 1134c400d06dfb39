//! Chat templates: turning a conversation into the prompt the model expects.
//!
//! Pollen renders ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), the format
//! of SmolLM2 and many others, without a template engine. When the model's own
//! template inserts a default system prompt, we insert the same one.

use crate::tokenizer::PollenTokenizer;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A message of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The default system prompt a template inserts when the conversation has none.
pub fn default_system_prompt(tok: &PollenTokenizer) -> Option<String> {
    let template = tok.chat_template()?;
    // The template writes the newline either raw or as a `\n` escape.
    let (idx, marker) = ["<|im_start|>system\n", "<|im_start|>system\\n"]
        .iter()
        .find_map(|m| template.find(m).map(|i| (i, *m)))?;
    let start = idx + marker.len();
    let rest = template.get(start..)?;
    let end = rest.find("<|im_end|>")?;
    rest.get(..end).map(str::to_string)
}

/// Renders `messages` as ChatML and opens the assistant's turn.
pub fn render_chatml(tok: &PollenTokenizer, messages: &[Message]) -> String {
    let mut out = String::new();
    if messages.first().is_none_or(|m| m.role != "system")
        && let Some(system) = default_system_prompt(tok)
    {
        out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
    }
    for m in messages {
        out.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role, m.content
        ));
    }
    out.push_str("<|im_start|>assistant\n");
    out
}
