// ARIA tabs: click or arrow keys (Left/Right, Home/End) pick a tab; the tab's aria-controls
// panel is shown and its siblings hidden. One listener per tablist, so tabs added later work too.

export function selectTab(list, tab, onSelect) {
  for (const t of list.querySelectorAll("[role=tab]")) {
    const on = t === tab;
    t.setAttribute("aria-selected", on ? "true" : "false");
    t.tabIndex = on ? 0 : -1;
    const panel = t.getAttribute("aria-controls") && document.getElementById(t.getAttribute("aria-controls"));
    if (panel) panel.hidden = !on;
  }
  if (onSelect) onSelect(tab);
}

export function initTabs(list, onSelect) {
  if (list.dataset.tabs) return;
  list.dataset.tabs = "on";
  list.addEventListener("click", (e) => {
    const tab = e.target.closest("[role=tab]");
    if (tab && list.contains(tab)) selectTab(list, tab, onSelect);
  });
  list.addEventListener("keydown", (e) => {
    const tabs = [...list.querySelectorAll("[role=tab]")];
    const i = tabs.indexOf(document.activeElement);
    if (i < 0) return;
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    const tab = tabs[(next + tabs.length) % tabs.length];
    tab.focus();
    selectTab(list, tab, onSelect);
  });
}
