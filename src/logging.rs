//! Tracing to stderr, with the node's name at the start of every line (openraft's own tasks too,
//! which do not run inside our spans).

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

struct Tagged<F> {
    node: String,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Tagged<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{} ", self.node)?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// Logs at `RUST_LOG` (default: info for raftmgr, warn for openraft's chatter).
pub fn init(node: Option<&str>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let format = Tagged {
        node: node.map(|n| format!("node={n}")).unwrap_or_default(),
        inner: tracing_subscriber::fmt::format()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal()),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(format)
        .init();
}
