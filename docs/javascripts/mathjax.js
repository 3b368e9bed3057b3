window.MathJax = {
  tex: {inlineMath: [["\\(", "\\)"], ["$", "$"]], displayMath: [["\\[", "\\]"], ["$$", "$$"]],
        processEscapes: true, processEnvironments: true},
  options: {ignoreHtmlClass: "md-[\\w-]*", processHtmlClass: "arithmatex|jupyter-wrapper"}
};
document$.subscribe(() => {
  MathJax.startup.output.clearCache(); MathJax.typesetClear(); MathJax.texReset();
  MathJax.typesetPromise();
});
