// Typeset the maths that pymdownx.arithmatex (generic mode) leaves in
// <span class="arithmatex"> / <div class="arithmatex">, on first load and on
// every instant-navigation page change of mkdocs-material.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    // arithmatex (generic mode) writes \( … \) and \[ … \]; a dollar sign in prose stays text
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true }
    ],
  })
})
