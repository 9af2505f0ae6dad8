package hgbundle

// CountRevs exposes countRevs to the package's external tests.
var CountRevs = countRevs
