function (doc, req) {
  if (doc._deleted) { return true; }
  var mac = String(req.query.mac);
  // Only a number or a string names a node: String([1000]) is '1000' too.
  function names(value) {
    return (typeof value === 'number' || typeof value === 'string') && String(value) === mac;
  }
  var type = doc.type;
  if (names(type) || type === 'himbeere-placed' || type === 'himbeere-program' ||
      type === 'himbeere-daemon-current' || doc.global_modules !== undefined) {
    return true;
  }
  if (String(req.query.kind) === 'code') { return false; }
  if (type === 'himbeere-command') {
    var targets = doc.targets;
    if (targets === 'all') { return true; }
    if (Object.prototype.toString.call(targets) !== '[object Array]') { return false; }
    for (var i = 0; i < targets.length; i++) {
      if (names(targets[i])) { return true; }
    }
    return false;
  }
  return type === mac + '_cmd';
}
