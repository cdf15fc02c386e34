"""The picture of `safetrain report`: report.plot_data drawn with matplotlib.

Everything drawn (points, which of them a rollback undid, incident markers,
the rollback arrows, the note under the plots, the step axis's extent) is
computed by report.plot_data, where tests check it without matplotlib; this
module only turns it into panels, lines, colours and labels.
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib
from matplotlib import ticker
from matplotlib.lines import Line2D

from safetrain.storage import files as storage


def draw(data: dict[str, Any], path: str, title: str) -> None:
  """Draws `report.plot_data` output to a PNG at `path`."""
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  s = data["series"]
  panels = ["loss", "grad", "lr"] + (["loss_scale"] if data["fp16"] else [])
  heights = [{"loss": 3.0, "grad": 2.0, "lr": 1.4, "loss_scale": 1.4}[p] for p in panels]
  note = data["note"]
  if note:
    heights.append(0.21 * (note.count("\n") + 1) + 0.1)
  fig = plt.figure(figsize=(11, 1.36 * sum(heights) + 1.2), constrained_layout=True)
  grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
  axes = []
  for i in range(len(panels)):
    axes.append(fig.add_subplot(grid[i], sharex=axes[0] if axes else None))
    if i < len(panels) - 1:
      axes[-1].tick_params(labelbottom=False)
  if note:
    # The diagnosis of the last rollback or abort, under the plots: the why.
    box = fig.add_subplot(grid[len(panels)])
    box.axis("off")
    text = box.text(0, 1, note, va="top", ha="left", fontsize=9, transform=box.transAxes)
    text.set_in_layout(False)  # its row's height is reserved; don't squeeze the plots
  ax = dict(zip(panels, axes))
  main, faded = "#1f4e79", "#9aa7b4"

  def line(a, key, color, label, style="-", marker=None, undone_label=None):
    if key not in s:
      return
    d = s[key]
    kx = [x for x, k in zip(d["x"], d["kept"]) if k]
    ky = [y for y, k in zip(d["y"], d["kept"]) if k]
    a.plot(kx, ky, style, color=color, lw=1.6, label=label, marker=marker, ms=3)
    undone = [(x, y) for x, y, k in zip(d["x"], d["y"], d["kept"]) if not k]
    if undone:
      a.plot(
        [p[0] for p in undone],
        [p[1] for p in undone],
        "x",
        color=color,
        alpha=0.6,
        ms=7,
        mew=1.5,
        label=undone_label or "_nolegend_",
      )

  line(ax["loss"], "loss", main, "train loss", undone_label="loss of steps a rollback undid")
  line(ax["loss"], "eval_loss", "#e66101", "eval loss", style="--", marker="o")
  ax["loss"].set_ylabel("loss")
  _log_if_positive(ax["loss"], s, ("loss", "eval_loss"))

  line(ax["grad"], "grad_norm", main, "grad norm (mean, before clipping)")
  line(ax["grad"], "grad_norm_max", faded, "grad norm (max)", style=":")
  if data["clip"] > 0:
    ax["grad"].axhline(data["clip"], color="#555555", lw=1, ls="--", label="clip.global_norm")
  ax["grad"].set_ylabel("gradient norm")
  _log_if_positive(ax["grad"], s, ("grad_norm", "grad_norm_max"))

  if "lr_scale" in s:
    d = s["lr_scale"]
    ax["lr"].plot(d["x"], d["y"], color="#4d9221", lw=1.6, drawstyle="steps-post")
  ax["lr"].set_yscale("log")
  ax["lr"].set_ylabel("lr scale")
  if "loss_scale" in ax:
    if "loss_scale" in s:
      d = s["loss_scale"]
      ax["loss_scale"].plot(d["x"], d["y"], color="#762a83", lw=1.6, drawstyle="steps-post")
    ax["loss_scale"].set_yscale("log", base=2)
    ax["loss_scale"].set_ylabel("loss scale")

  # Incidents: vertical lines in every panel, colored by kind; rollbacks
  # solid with an arrow back to the restored step, aborts thick. Drawn
  # grouped, one collection per kind and action with at most one line per
  # bin of the step axis (report.incident_groups): 150,000 incidents draw
  # in seconds.
  kinds_seen, actions_seen, counts = _draw_incidents(axes, data)
  top = ax["loss"]
  if "loss" not in s:
    top.text(0.5, 0.5, "no step was applied", transform=top.transAxes, ha="center", color="#777777")
  # The rollback's story in the lr panel: from the step where the run gave up,
  # back to the restored step, down to the lowered learning-rate scale.
  for step, before, restored, after in data["arrows"]:
    ax["lr"].annotate(
      "",
      xy=(restored, after),
      xytext=(step, before),
      arrowprops=dict(
        arrowstyle="->",
        color="#333333",
        lw=0.9,
        shrinkA=0,
        shrinkB=2,
        connectionstyle="arc3,rad=0.0",
      ),
    )
  for step in data["aborts"]:
    top.annotate(
      "abort",
      xy=(step, 0.5),
      xycoords=("data", "axes fraction"),
      color="#b2182b",
      fontweight="bold",
      ha="right",
      rotation=90,
    )

  handles = [
    Line2D([], [], color=data["kind_colours"].get(k, "black"), lw=2, label=f"{k} ({counts[k]})")
    for k in kinds_seen
  ]
  labels = {
    "rollback": ("-", 1.4, "rollback (arrows: back to the restored step, lower lr)"),
    "abort": ("-", 3.0, "abort"),
    "skipped_step": (":", 1.0, "skipped step(s)"),
    "dropped_rows": ((0, (2, 2)), 1.2, "rows dropped"),
    "skipped_batch": ((0, (2, 2)), 1.2, "batch skipped"),
  }
  for act in actions_seen:
    ls, lw, label = labels.get(act, ("-", 1, act))
    handles.append(Line2D([], [], color="#444444", ls=ls, lw=lw, label=label))
  h, lab = top.get_legend_handles_labels()
  top.legend(h + handles, lab + [x.get_label() for x in handles], fontsize=8, loc="best", ncol=2)
  ax["grad"].legend(fontsize=8, loc="best")

  axes[-1].set_xlim(0, data["x_max"])
  xlabel = "step (applied updates)"
  if data["log_steps"]:
    # Everything happened early in a long run: a log step axis spreads the
    # incidents out instead of stacking them on the left edge.
    axes[-1].set_xscale("symlog", linthresh=1.0, linscale=0.3)
    axes[-1].xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    xlabel += ", log scale"
  axes[-1].set_xlabel(xlabel)
  for a in axes:
    a.grid(True, which="major", alpha=0.3)
    _short_log_labels(a)
  if "loss_scale" in ax:
    ax["loss_scale"].yaxis.set_major_formatter(
      ticker.FuncFormatter(lambda v, _: f"2^{math.log2(v):.3g}" if v > 0 else "0")
    )
    ax["loss_scale"].yaxis.set_minor_formatter(ticker.NullFormatter())
  fig.suptitle(title, fontsize=11)
  # Into memory first: the workdir may be any tf.io.gfile path, and the
  # file is then written atomically (a reader never sees half a PNG).
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  storage.write(path, buffer.getvalue())
  plt.close(fig)


def _draw_incidents(axes, data: dict[str, Any]) -> tuple[list, list, dict]:
  """The incident groups in every panel; (kinds, actions, records per kind)."""
  kinds_seen, actions_seen, counts = [], [], {}
  for g in data["incident_groups"]:
    color = data["kind_colours"].get(g["kind"], "black")
    act = g["action"]
    style = {
      "rollback": dict(linestyles="-", linewidths=1.4, alpha=0.9),
      "abort": dict(linestyles="-", linewidths=3.0, alpha=1.0),
      "skipped_step": dict(linestyles=":", linewidths=1.0, alpha=0.8),
    }.get(act, dict(linestyles=[(0, (2, 2))], linewidths=1.2, alpha=0.8))
    for a in axes:
      a.vlines(g["steps"], 0, 1, transform=a.get_xaxis_transform(), colors=color, zorder=0, **style)
    if g["kind"] not in kinds_seen:
      kinds_seen.append(g["kind"])
    counts[g["kind"]] = counts.get(g["kind"], 0) + g["records"]
    if act not in actions_seen:
      actions_seen.append(act)
  return kinds_seen, actions_seen, counts


def _short(v: float, _pos=None) -> str:
  text = f"{v:.3g}"
  if "e" in text:
    mantissa, exp = text.split("e")
    text = ("" if mantissa == "1" else mantissa + "x") + f"1e{int(exp)}"
  return text


def _short_log_labels(a) -> None:
  """Tick labels like 0.5, 2.4 and 1e36 instead of 5x10^-1 on log y axes."""
  if a.get_yscale() != "log":
    return
  lo, hi = a.get_ylim()
  a.yaxis.set_major_formatter(ticker.FuncFormatter(_short))
  # Within a decade or so, label the minor ticks too, or there are none.
  small = lo > 0 and hi / lo < 20
  a.yaxis.set_minor_formatter(ticker.FuncFormatter(_short) if small else ticker.NullFormatter())


def _log_if_positive(a, series, keys) -> None:
  ys = [y for k in keys if k in series for y in series[k]["y"]]
  if ys and min(ys) > 0:
    a.set_yscale("log")
