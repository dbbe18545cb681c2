// Typeset the maths that pymdownx.arithmatex (generic mode) leaves in
// <span class="arithmatex"> / <div class="arithmatex">, on first load and on
// every instant-navigation page change of mkdocs-material.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true }
    ],
  })
})
