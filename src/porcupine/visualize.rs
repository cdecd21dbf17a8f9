//! Renders a [`LinearizationInfo`] as one self-contained HTML page (inline CSS and JS, no
//! external resources), so that a failing test can leave a file a person opens in any browser.
//!
//! Each partition is a time diagram with one row per client. Time is drawn by rank (the n-th
//! distinct call/return instant is at x = n) rather than to scale, so that overlaps between
//! short operations stay visible next to long ones. Operations in the linearization (or longest
//! linearizable prefix) are green and numbered in linearization order; the operation that could
//! not be placed after that prefix is red; hovering shows descriptions and states.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::Path;

use super::info::{LinearizationInfo, PartitionInfo};
use super::model::{CheckResult, Model};

/// Horizontal pixels per time rank.
const PIXELS_PER_RANK: usize = 14;
/// Vertical pixels per client row.
const ROW_HEIGHT_PX: usize = 26;

/// Writes the visualization of `info` as an HTML page to `out`.
///
/// `model` describes its initial state in the page header; the operations and states in `info`
/// were described by the model when it was computed.
pub fn visualize<M: Model>(
    model: &M,
    info: &LinearizationInfo,
    out: &mut impl Write,
) -> io::Result<()> {
    let mut html = String::new();
    html.push_str(PAGE_HEAD);
    let illegal = info.illegal_partitions().count();
    let unknown = info
        .partitions
        .iter()
        .filter(|partition| partition.result == CheckResult::Unknown)
        .count();
    let _ = write!(
        html,
        "<h1>Linearizability check</h1>\n<p>{} partition(s): {} illegal, {} undecided. \
         Initial state: <code>{}</code>. Hover over an operation for details.</p>\n\
         <p class=\"legend\"><span class=\"op lin\">linearized</span> \
         <span class=\"op bad\">could not be placed</span> \
         <span class=\"op rest\">not reached</span> \
         <span class=\"op open\">never returned</span></p>\n",
        info.partitions.len(),
        illegal,
        unknown,
        escape(&model.describe_state(&model.init())),
    );
    for (index, partition) in info.partitions.iter().enumerate() {
        render_partition(&mut html, index, partition);
    }
    html.push_str(PAGE_TAIL);
    out.write_all(html.as_bytes())
}

/// [`visualize`] into a new file at `path`.
pub fn visualize_to_file<M: Model>(
    model: &M,
    info: &LinearizationInfo,
    path: &Path,
) -> io::Result<()> {
    let mut file = io::BufWriter::new(std::fs::File::create(path)?);
    visualize(model, info, &mut file)?;
    file.flush()
}

fn render_partition(html: &mut String, index: usize, partition: &PartitionInfo) {
    let verdict = match partition.result {
        CheckResult::Ok => "linearizable",
        CheckResult::Illegal => "NOT linearizable",
        CheckResult::Unknown => "undecided (timed out)",
    };
    // Illegal partitions are what a reader came for: open them; fold the rest.
    let open = if partition.result == CheckResult::Illegal {
        " open"
    } else {
        ""
    };
    let prefix_name = if partition.result == CheckResult::Ok {
        "linearization"
    } else {
        "longest linearizable prefix"
    };
    let _ = writeln!(
        html,
        "<details{open}><summary>Partition {index}: {verdict} — {} operations, {prefix_name} of \
         {}</summary>",
        partition.ops.len(),
        partition.linearization.len()
    );

    // Where each operation sits in the linearization, and the state it left.
    let mut step_of_op: Vec<Option<usize>> = vec![None; partition.ops.len()];
    for (step, linearized) in partition.linearization.iter().enumerate() {
        if let Some(slot) = step_of_op.get_mut(linearized.op) {
            *slot = Some(step);
        }
    }

    let instants: Vec<i64> = partition
        .ops
        .iter()
        .flat_map(|op| std::iter::once(op.call).chain(op.return_time))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let rank = |time: i64| instants.partition_point(|&instant| instant < time);
    let clients: Vec<usize> = partition
        .ops
        .iter()
        .map(|op| op.client_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let width_px = (instants.len() + 2) * PIXELS_PER_RANK;
    let height_px = clients.len() * ROW_HEIGHT_PX;

    html.push_str("<div class=\"diagram\">\n<div class=\"labels\">");
    for client in &clients {
        let _ = write!(html, "<div class=\"label\">client {client}</div>");
    }
    let _ = write!(
        html,
        "</div>\n<div class=\"scroll\"><div class=\"lanes\" style=\"width:{width_px}px;\
         height:{height_px}px\">\n"
    );
    for (op_index, op) in partition.ops.iter().enumerate() {
        let row = clients.binary_search(&op.client_id).unwrap_or(0);
        let start = rank(op.call);
        // An open call extends to the end of the diagram.
        let end = op.return_time.map_or(instants.len() + 1, rank);
        let left = start * PIXELS_PER_RANK;
        let width = ((end - start) * PIXELS_PER_RANK).max(PIXELS_PER_RANK / 2);
        let top = row * ROW_HEIGHT_PX + 3;
        let step = step_of_op[op_index];
        let class = if partition.unplaceable == Some(op_index) {
            "bad"
        } else if step.is_some() {
            "lin"
        } else if op.return_time.is_none() {
            "open"
        } else {
            "rest"
        };
        let label = step.map_or(String::new(), |step| (step + 1).to_string());
        let state = step.map_or(String::new(), |step| {
            partition.linearization[step].state_after.clone()
        });
        let returned = op
            .return_time
            .map_or("never".to_string(), |time| time.to_string());
        let _ = writeln!(
            html,
            "<div class=\"op {class}\" style=\"left:{left}px;width:{width}px;top:{top}px\" \
             data-desc=\"{desc}\" data-state=\"{state}\" data-step=\"{label}\" \
             data-time=\"client {client}, called {call}, returned {returned}\" \
             title=\"{desc}\">{label}</div>",
            desc = escape(&op.description),
            state = escape(&state),
            client = op.client_id,
            call = op.call,
        );
    }
    html.push_str("</div></div>\n</div>\n");

    // The same story as text, for copying into a bug report.
    let _ = write!(
        html,
        "<p>Initial state <code>{}</code>; {prefix_name}:</p>\n<ol class=\"steps\">",
        escape(&partition.initial_state)
    );
    for linearized in &partition.linearization {
        let description = partition
            .ops
            .get(linearized.op)
            .map_or("?", |op| op.description.as_str());
        let _ = write!(
            html,
            "<li><code>{}</code> → <code>{}</code></li>",
            escape(description),
            escape(&linearized.state_after)
        );
    }
    html.push_str("</ol>\n");
    if let Some(op) = partition
        .unplaceable
        .and_then(|op_index| partition.ops.get(op_index))
    {
        let _ = writeln!(
            html,
            "<p class=\"stuck\">Could not be placed next: <code>{}</code> (client {})</p>",
            escape(&op.description),
            op.client_id
        );
    }
    html.push_str("</details>\n");
}

/// Escapes text for HTML content and double- or single-quoted attributes.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

const PAGE_HEAD: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Linearizability check</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1em 2em 8em 2em; color: #222; }
code { font-family: ui-monospace, monospace; }
summary { font-weight: 600; cursor: pointer; margin: 0.6em 0; }
.diagram { display: flex; border: 1px solid #ccc; margin: 0.5em 0; }
.labels { flex: none; border-right: 1px solid #ccc; background: #fafafa; }
.label { height: 26px; line-height: 26px; padding: 0 0.5em; font-size: 12px; white-space: nowrap; }
.scroll { overflow-x: auto; flex: auto; }
.lanes { position: relative; background: repeating-linear-gradient(#fff 0 26px, #f4f4f4 26px 52px); }
.op { position: absolute; height: 20px; box-sizing: border-box; border-radius: 3px;
      font-size: 11px; line-height: 18px; text-align: center; overflow: hidden; cursor: default;
      border: 1px solid rgba(0,0,0,0.35); }
.legend .op { position: static; display: inline-block; padding: 0 0.5em; margin-right: 0.5em; }
.lin { background: #9fd89f; }
.bad { background: #f08080; border: 2px solid #a00; font-weight: 700; }
.rest { background: #ddd; }
.open { background: repeating-linear-gradient(45deg, #eee 0 4px, #ccc 4px 8px); }
.op.hover { outline: 2px solid #0366d6; z-index: 2; }
.steps { font-size: 13px; max-height: 20em; overflow-y: auto; }
.stuck { color: #a00; font-weight: 600; }
#details { position: fixed; bottom: 0; left: 0; right: 0; background: #fffbe6;
           border-top: 1px solid #e0c97f; padding: 0.5em 2em; font-size: 13px; min-height: 3.5em; }
</style>
</head>
<body>
"#;

const PAGE_TAIL: &str = r#"<div id="details">Hover over an operation.</div>
<script>
(function () {
  var panel = document.getElementById("details");
  function text(s) { return document.createTextNode(s); }
  function line(label, value) {
    var div = document.createElement("div");
    var b = document.createElement("b");
    b.appendChild(text(label));
    div.appendChild(b);
    div.appendChild(text(value));
    return div;
  }
  document.querySelectorAll(".lanes .op").forEach(function (op) {
    op.addEventListener("mouseenter", function () {
      op.classList.add("hover");
      panel.textContent = "";
      panel.appendChild(line("operation: ", op.dataset.desc));
      panel.appendChild(line("", op.dataset.time));
      if (op.dataset.step) {
        panel.appendChild(line("linearized #" + op.dataset.step + ", state after: ", op.dataset.state));
      } else if (op.classList.contains("bad")) {
        panel.appendChild(line("", "could not be placed after the longest prefix"));
      } else {
        panel.appendChild(line("", "not in the linearization shown"));
      }
    });
    op.addEventListener("mouseleave", function () { op.classList.remove("hover"); });
  });
})();
</script>
</body>
</html>
"#;
