package agent

import (
	"strings"
	"testing"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

func TestAdvertisedOrderIsOwnRegionPreferenceRestThenDraining(t *testing.T) {
	tg := func(name, region string, weight uint32, state pb.TargetState, healthy, sni bool) *pb.Target {
		return &pb.Target{Name: name, Region: region, Weight: weight, State: state, Healthy: healthy, SniRequired: sni,
			Protocol: "https", Uris: []string{"https://" + name + "/"}}
	}
	active := pb.TargetState_TARGET_STATE_ACTIVE
	msg := &pb.WatchTargetsResponse{RegionPreference: []string{"eu", "ap"}, Targets: []*pb.Target{
		tg("ap-1", "ap", 1, active, true, false),
		tg("eu-1", "eu", 1, active, true, false),
		tg("us-light", "us", 1, active, true, false),
		tg("us-heavy", "us", 5, active, true, true),
		tg("sa-1", "sa", 9, active, true, false),
		tg("us-sick", "us", 9, active, false, false),
		tg("us-drain", "us", 9, pb.TargetState_TARGET_STATE_DRAINING, true, false),
		tg("ap-drain", "ap", 1, pb.TargetState_TARGET_STATE_DRAINING, true, false),
		tg("eu-drain", "eu", 1, pb.TargetState_TARGET_STATE_DRAINING, true, false),
		tg("eu-drain-sick", "eu", 1, pb.TargetState_TARGET_STATE_DRAINING, false, false),
		tg("us-off", "us", 9, pb.TargetState_TARGET_STATE_DISABLED, true, false),
	}}
	order := func(region string) string {
		return strings.Join(orderTargets(msg, region).Names(), ",")
	}
	// Own region, then the preference (eu, ap), then the rest; draining targets last, in the
	// same order; disabled and unhealthy ones not at all.
	for region, want := range map[string]string{
		"us": "us-heavy,us-light,eu-1,ap-1,sa-1,us-drain,eu-drain,ap-drain",
		"ap": "ap-1,eu-1,sa-1,us-heavy,us-light,ap-drain,eu-drain,us-drain",
		"sa": "sa-1,eu-1,ap-1,us-heavy,us-light,eu-drain,ap-drain,us-drain",
	} {
		if got := order(region); got != want {
			t.Errorf("agent in %s advertises %s, want %s", region, got, want)
		}
	}
}
