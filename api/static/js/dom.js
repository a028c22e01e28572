// Redraws that keep the elements already on the page: a list drawn again every second (the
// jobs while one is polled, the rows while results arrive) must not take the keyboard focus
// away from the link or button the user is on, as rebuilding it would.

/** Set `el`'s text, only when it differs (no needless mutation for assistive technology). */
export function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

/** Set attribute `name` of `el` to `value` (null: remove it), only when it differs. */
export function setAttr(el, name, value) {
  if (value === null) {
    if (el.hasAttribute(name)) el.removeAttribute(name);
  } else if (el.getAttribute(name) !== value) {
    el.setAttribute(name, value);
  }
}

/**
 * Make `nodes` the children of `parent`, in that order: children not among them go, new ones
 * come in, and of those already there the longest run in the right order stays where it is;
 * only the others move (with `moveBefore` where the browser has it, which keeps focus).
 */
export function placeChildren(parent, nodes) {
  const wanted = new Set(nodes);
  for (const child of [...parent.children]) if (!wanted.has(child)) child.remove();
  const position = new Map(nodes.map((node, i) => [node, i]));
  const staying = new Set(longestIncreasing([...parent.children].map((c) => position.get(c))));
  // From the end: each node that moves goes just before its successor, already in place.
  let next = null;
  for (let i = nodes.length - 1; i >= 0; i--) {
    const node = nodes[i];
    if (!staying.has(i)) {
      if (node.parentNode === parent && parent.moveBefore && parent.isConnected) parent.moveBefore(node, next);
      else parent.insertBefore(node, next);
    }
    next = node;
  }
}

/** The longest strictly increasing subsequence of `seq` (its values). */
function longestIncreasing(seq) {
  const tails = []; // tails[k]: where in seq the smallest last value of a run of k + 1 is
  const prev = new Array(seq.length);
  seq.forEach((value, i) => {
    let lo = 0;
    let hi = tails.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (seq[tails[mid]] < value) lo = mid + 1;
      else hi = mid;
    }
    prev[i] = lo > 0 ? tails[lo - 1] : -1;
    tails[lo] = i;
  });
  const run = [];
  for (let i = tails.length ? tails[tails.length - 1] : -1; i >= 0; i = prev[i]) run.push(seq[i]);
  return run.reverse();
}
