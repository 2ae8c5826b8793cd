//! Progress of the long jobs (`preload --all`, `reconcile --all`): a live
//! line with the count, rate and elapsed time when standard error is a
//! terminal, one plain line per page otherwise (logs, CI). Both go to
//! standard error, so standard output stays the command's result (pure JSON
//! with `--json`). Each report carries the cursor an interrupted run resumes
//! from.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::render::shell_word;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A redrawn line (standard error is a terminal).
    Bar,
    /// One line per page.
    Lines,
}

/// The progress of one job.
pub struct Progress {
    /// `preloaded`, `reconciled`.
    what: &'static str,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn start(what: &'static str, display: Display) -> Progress {
        let bar = (display == Display::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix}: {human_pos} items, {per_sec}, {elapsed} {wide_msg}",
                )
                .expect("a valid progress template"),
            );
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            what,
            started: Instant::now(),
            bar,
        }
    }

    /// After a page: `done` items so far; `cursor` is where the next page
    /// starts (empty after the last).
    pub fn page(&self, done: u64, cursor: &str, err: &mut dyn Write) -> io::Result<()> {
        let resume = if cursor.is_empty() {
            String::new()
        } else {
            format!("(resume with --cursor {})", shell_word(cursor))
        };
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(resume);
                Ok(())
            }
            None => {
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                let rate = done as f64 / secs;
                let line = format!(
                    "{}: {done} items, {secs:.1} s, {rate:.0} items/s",
                    self.what
                );
                if resume.is_empty() {
                    writeln!(err, "{line}")
                } else {
                    writeln!(err, "{line} {resume}")
                }
            }
        }
    }

    /// The job ended (done, failed or interrupted): the bar leaves its last
    /// state on the screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
