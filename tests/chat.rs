//! `pollen chat` in a real terminal: tmux runs it in a pseudo-terminal, the test types
//! with `send-keys` and reads the screen with `capture-pane`. Greedy answers equal
//! `pollen generate` (the first turn with `--chat`, the second with the whole
//! conversation as its prompt), Ctrl-C stops an answer and returns to the prompt,
//! `/reset` forgets the conversation, and `/quit`, Ctrl-D and Ctrl-C twice leave with
//! status 0. Locally, and once through a real 3-server mesh.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Most tokens an answer may have in these tests.
const MAX_TOKENS: usize = 300;
const Q1: &str = "What is the capital of France? Answer briefly.";
const Q2: &str = "And of Germany?";
const LONG: &str = "Write a very long story about a dragon who learns to bake bread.";

/// What the pane's shell prints when the command exits, before its status.
const EXITED: &str = "[exit status ";
/// The pane's shell: with job control on (`set -m`) it runs the command in a process
/// group of its own in the terminal's foreground, as an interactive shell does, so
/// Ctrl-C signals the command alone.
const WRAPPER: &str = "set -m; \"$@\"; echo \"[exit status $?]\"; exec sleep 600";

/// A tmux server of its own (its own socket) running one command in a pane of 200×50.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(dir: &Path, args: &[String]) -> Tmux {
        let socket = format!("pollen-chat-{}", dir.file_name().unwrap().to_string_lossy());
        let conf = dir.join("tmux.conf");
        std::fs::write(&conf, "set -g history-limit 50000\n").unwrap();
        let t = Tmux { socket };
        let status = Command::new("tmux")
            .args(["-L", &t.socket, "-f"])
            .arg(&conf)
            .args(["new-session", "-d", "-s", "chat", "-x", "200", "-y", "50"])
            // A shell runs the command and prints its exit status; the pane stays.
            .args(["sh", "-c", WRAPPER, "sh"])
            .args(args)
            .status()
            .expect("tmux is needed for this test (.ci/run installs it)");
        assert!(status.success());
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The whole pane, history included, wrapped lines joined, trailing spaces cut.
    fn screen(&self) -> Vec<String> {
        let text = self.tmux(&["capture-pane", "-p", "-J", "-S", "-", "-t", "chat"]);
        let mut lines: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }

    /// Waits until `f` holds for the screen; the screen.
    fn wait(&self, what: &str, timeout: Duration, f: impl Fn(&[String]) -> bool) -> Vec<String> {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "waited {timeout:?} for {what}; the screen:\n{}",
                s.join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "chat", "-l", text]);
    }

    /// Presses keys (`Enter`, `C-c`, `C-d`).
    fn keys(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", "chat", keys]);
    }

    /// The exit status of the command, once it has exited (its shell prints it).
    fn exit_status(&self, timeout: Duration) -> i32 {
        let s = self.wait("the command to exit", timeout, |s| {
            s.iter().any(|l| l.starts_with(EXITED))
        });
        let line = s.iter().find(|l| l.starts_with(EXITED)).unwrap();
        line[EXITED.len()..].trim_end_matches(']').parse().unwrap()
    }

    /// Asks `question` and waits for the answer and the next prompt; the answer's lines.
    fn ask(&self, question: &str, timeout: Duration) -> String {
        let asked = format!("> {question}");
        let before = self.screen().iter().filter(|l| **l == asked).count();
        self.type_text(question);
        self.keys("Enter");
        let s = self.wait(&format!("the answer to {question:?}"), timeout, |s| {
            s.iter().filter(|l| **l == asked).count() > before && is_prompt(s.last())
        });
        let at = s.iter().rposition(|l| *l == asked).unwrap();
        s[at + 1..s.len() - 1].join("\n")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// An empty prompt line.
fn is_prompt(line: Option<&String>) -> bool {
    line.is_some_and(|l| l == ">")
}

/// The `pollen chat` command line: greedy, one thread.
fn chat_args(bootstrap: Option<&str>) -> Vec<String> {
    let mut a: Vec<String> = [
        "chat",
        "--threads",
        "1",
        "--temperature",
        "0",
        "--max-tokens",
        &MAX_TOKENS.to_string(),
        "--model",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.insert(0, pollen().display().to_string());
    a.push(model().display().to_string());
    match bootstrap {
        Some(b) => a.extend(["--no-mdns", "--bootstrap", b].map(String::from)),
        None => a.push("--local".into()),
    }
    a
}

/// Text as the terminal shows it: lines without trailing spaces, no trailing newline.
fn as_shown(text: &str) -> String {
    text.trim_end_matches('\n')
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

/// SmolLM2's chat template (ChatML with its default system prompt) over `turns`, the
/// assistant's turn opened: the prompt the chat must have sent for the last question.
fn chatml(turns: &[(&str, &str)], question: &str) -> String {
    let mut p = String::from(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    );
    for (q, a) in turns {
        p += &format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n");
    }
    p += &format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n");
    p
}

/// Waits for the banner and the first prompt.
fn started(t: &Tmux) {
    t.wait("the first prompt", Duration::from_secs(60), |s| {
        s.iter().any(|l| l.starts_with("pollen chat: ")) && is_prompt(s.last())
    });
}

/// `/reset`, and waits for the prompt (keys typed before it would be lost).
fn reset(t: &Tmux) {
    let before = t
        .screen()
        .iter()
        .filter(|l| *l == "(a new conversation)")
        .count();
    t.type_text("/reset");
    t.keys("Enter");
    t.wait("the reset", Duration::from_secs(10), |s| {
        s.iter().filter(|l| *l == "(a new conversation)").count() > before && is_prompt(s.last())
    });
}

/// Stops a long answer with Ctrl-C once it has begun; the prompt comes back.
fn stop_mid_answer(t: &Tmux) {
    let asked = format!("> {LONG}");
    t.type_text(LONG);
    t.keys("Enter");
    // Some words of the answer are on the screen: it is streaming.
    t.wait("the long answer to start", Duration::from_secs(60), |s| {
        s.iter()
            .rposition(|l| *l == asked)
            .is_some_and(|at| s[at + 1..].iter().map(|l| l.len()).sum::<usize>() > 20)
    });
    t.keys("C-c");
    let s = t.wait("the prompt after Ctrl-C", Duration::from_secs(20), |s| {
        is_prompt(s.last()) && s.iter().any(|l| l.starts_with("(stopped"))
    });
    let at = s.iter().rposition(|l| *l == asked).unwrap();
    let stopped = s.iter().rposition(|l| l.starts_with("(stopped")).unwrap();
    let words: usize = s[at + 1..stopped]
        .iter()
        .map(|l| l.split_whitespace().count())
        .sum();
    // Cut well before its 300 tokens.
    assert!(words < 150, "the answer was not stopped:\n{}", s.join("\n"));
}

#[test]
fn local_chat_streams_keeps_history_stops_resets_and_quits() {
    let dir = temp_dir("chat");
    let want1 = local_answer(Q1, true, MAX_TOKENS);
    assert!(!want1.trim().is_empty());
    let a1 = want1.trim_end_matches('\n');
    // The second turn's prompt is the whole conversation.
    let want2 = generate(None, &chatml(&[(Q1, a1)], Q2), false, MAX_TOKENS);
    let alone2 = generate(None, Q2, true, MAX_TOKENS);
    assert_ne!(
        want2, alone2,
        "pick a second question that depends on the first"
    );

    let t = Tmux::start(&dir, &chat_args(None));
    started(&t);
    assert_eq!(t.ask(Q1, Duration::from_secs(60)), as_shown(&want1));
    assert_eq!(t.ask(Q2, Duration::from_secs(60)), as_shown(&want2));

    stop_mid_answer(&t);

    // After /reset the first question gets the first answer again: no history.
    reset(&t);
    assert_eq!(t.ask(Q1, Duration::from_secs(60)), as_shown(&want1));

    t.type_text("/quit");
    t.keys("Enter");
    assert_eq!(t.exit_status(Duration::from_secs(10)), 0);
}

#[test]
fn ctrl_c_clears_a_line_and_twice_at_an_empty_prompt_leaves_as_does_ctrl_d() {
    let dir = temp_dir("chatkeys");
    let t = Tmux::start(&dir, &chat_args(None));
    started(&t);
    // Ctrl-C with text typed clears the line and stays.
    t.type_text("half a question");
    t.keys("C-c");
    t.wait("the cleared line", Duration::from_secs(10), |s| {
        is_prompt(s.last()) && !s.iter().any(|l| l.contains("(Ctrl-C again"))
    });
    t.keys("C-c");
    t.wait("the hint", Duration::from_secs(10), |s| {
        s.iter().any(|l| l.contains("(Ctrl-C again")) && is_prompt(s.last())
    });
    t.keys("C-c");
    assert_eq!(t.exit_status(Duration::from_secs(10)), 0);
    drop(t);

    let dir = temp_dir("chateof");
    let t = Tmux::start(&dir, &chat_args(None));
    started(&t);
    t.keys("C-d");
    assert_eq!(t.exit_status(Duration::from_secs(10)), 0);
}

#[test]
fn swarm_chat_answers_like_local_and_ctrl_c_frees_the_route() {
    let dir = temp_dir("chatmesh");
    let (_boot, addr) = bootstrap(&dir, false);
    // One session per server: a stopped answer must free its session on every hop
    // for the next question to get through.
    let one = ["--max-sessions", "1"];
    let _servers = three_servers(Some(&addr), &dir, "c", [&one, &one, &one]);
    let want1 = local_answer(Q1, true, MAX_TOKENS);

    let t = Tmux::start(&dir, &chat_args(Some(&addr)));
    started(&t);
    assert_eq!(t.ask(Q1, Duration::from_secs(60)), as_shown(&want1));
    stop_mid_answer(&t);
    reset(&t);
    assert_eq!(t.ask(Q1, Duration::from_secs(60)), as_shown(&want1));
    t.type_text("/quit");
    t.keys("Enter");
    assert_eq!(t.exit_status(Duration::from_secs(10)), 0);
}

/// In a pipe, a conversation whose answers failed ends with an error (a script sees
/// it), and a `--max-tokens` that leaves no room for any question is refused at start
/// (every question used to fail, and chat still exited 0).
#[test]
fn a_piped_chat_whose_answers_failed_exits_with_an_error() {
    let run = |extra: &[&str], input: &str| {
        let out = output_with_input(
            Command::new(pollen())
                .args(["chat", "--threads", "1", "--temperature", "0", "--local"])
                .arg("--model")
                .arg(model())
                .args(extra),
            input,
        );
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, err) = run(&["--max-tokens", "3000"], "hi\n");
    assert!(!status.success(), "{err}");
    assert!(err.contains("--max-tokens 3000 leaves no room"), "{err}");
    let long = "word ".repeat(80);
    let (status, err) = run(
        &["--context-tokens", "64", "--max-tokens", "4"],
        &format!("hi\n{long}\n"),
    );
    assert!(!status.success(), "{err}");
    assert!(err.contains("1 of 2 questions got no answer"), "{err}");
    let (status, err) = run(&["--max-tokens", "4"], "hi\n");
    assert!(status.success(), "{err}");
}
